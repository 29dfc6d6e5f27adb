//! One connection to the Redis of `[redis]`, built the same way for rate limiting and
//! ACME: a single server through redis-rs' reconnecting `ConnectionManager`, or a Redis
//! Cluster; the password from `password_file` over any in the URL; the CA of
//! `rediss://`; bounded connection time. The connection is multiplexed: clones share it.
//! Imports only `config` (it sits at the bottom, next to it).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::config::redis::RedisSettings;

/// A connection to one Redis or to a cluster; cloning shares it.
#[derive(Clone)]
pub enum RedisConn {
    /// One server (reconnects by itself).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// How a connection is made.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Longest time to connect (and for a cluster, to answer one command).
    pub timeout: Duration,
    /// Longest time for one command on a single server; `None` leaves it to the caller.
    pub response_timeout: Option<Duration>,
    /// Longest wait between the connection manager's own reconnection attempts.
    pub max_reconnect_delay: Duration,
}

/// Connects to the Redis of `settings`.
pub async fn connect(settings: &RedisSettings, options: ConnectOptions) -> RedisResult<RedisConn> {
    let mut nodes = Vec::with_capacity(settings.urls.len());
    for url in &settings.urls {
        let info = url.as_str().into_connection_info()?;
        let mut redis = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(password) = &settings.password {
            redis = redis.set_password(password);
        }
        nodes.push(info.set_redis_settings(redis));
    }
    if settings.cluster {
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(options.timeout)
            .response_timeout(options.response_timeout.unwrap_or(options.timeout))
            .retries(1);
        if let Some(password) = &settings.password {
            builder = builder.password(password);
        }
        if let Some(ca) = &settings.ca {
            builder = builder.certs(certificates(ca));
        }
        let conn = builder.build()?.get_async_connection().await?;
        Ok(RedisConn::Cluster(conn))
    } else {
        let info = nodes.pop().ok_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        })?;
        let client = match &settings.ca {
            Some(ca) => redis::Client::build_with_tls(info, certificates(ca))?,
            None => redis::Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(options.response_timeout)
            .set_number_of_retries(1)
            .set_max_delay(options.max_reconnect_delay);
        let manager = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisConn::Single(manager))
    }
}

fn certificates(ca: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(manager) => manager.req_packed_command(cmd),
            RedisConn::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(manager) => manager.get_db(),
            RedisConn::Cluster(cluster) => cluster.get_db(),
        }
    }
}
