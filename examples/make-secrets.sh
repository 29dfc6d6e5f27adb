#!/bin/sh
# Creates the Docker secrets examples/docker-compose.yml uses, in ./secrets/ (or $1):
#   gatehouse_redis_password, django_redis_password: random passwords, one per client;
#   redis_users.acl: the Redis ACL file. `default` is off (no anonymous access); each
#   user has its own password, stored only as a SHA-256 hash, and its own permissions:
#   gatehouse may run the rate-limit script (EVALSHA, SCRIPT LOAD; the script calls
#   TIME, GET, SET) on keys under gatehouse:rl: and nothing else, so a leaked gateway
#   password cannot FLUSHALL, CONFIG SET or read the app's data.
# Existing files are kept (rerunning never changes a password); delete them to rotate.
set -eu
dir=${1:-./secrets}
umask 077
mkdir -p "$dir"
for user in gatehouse django; do
    file="$dir/${user}_redis_password"
    if [ ! -s "$file" ]; then
        openssl rand -hex 32 | tr -d '\n' > "$file"
    fi
done
hash() { printf '%s' "$(cat "$1")" | sha256sum | cut -d' ' -f1; }
rm -f "$dir/redis_users.acl"
cat > "$dir/redis_users.acl" <<ACL
user default off
user gatehouse on #$(hash "$dir/gatehouse_redis_password") resetkeys ~gatehouse:rl:* resetchannels -@all +evalsha +script|load +time +get +set
user django on #$(hash "$dir/django_redis_password") ~* &* +@all -@admin -@dangerous
ACL
# Compose mounts secret files as they are on the host: the containers' users (gatehouse
# 65532, redis 999, your app's) must be able to read them; the directory stays 0700.
chmod 0444 "$dir"/gatehouse_redis_password "$dir"/django_redis_password "$dir"/redis_users.acl
chmod 0700 "$dir"
echo "secrets written to $dir: gatehouse_redis_password, django_redis_password, redis_users.acl"
