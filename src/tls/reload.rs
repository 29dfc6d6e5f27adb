//! Certificate hot reload (placeholder until the watcher lands).
