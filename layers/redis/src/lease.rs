//! Ownership leases and the cross-instance live tail.
//!
//! **Lease.** `p:{h}:lease` holds the ID of the instance that reads the
//! stream's upstream while no client is attached (linger). It is taken with
//! `SET key holder NX PX ttl`; a holder renews it, and releases it, with Lua
//! scripts that compare the value first, so only the holder can do either. A
//! holder that dies loses it when the TTL runs out.
//!
//! **Tail.** `XREAD BLOCK ms COUNT n STREAMS p:{h}:v4:log <seq>-<u64::MAX>` (after every
//! entry of that sequence) on a connection of its own: the store's
//! [`ConnectionManager`](redis::aio::ConnectionManager)
//! multiplexes every command, so a blocking read on it would stall them all.
//! Tail connections are opened on demand and kept in a small pool of idle ones.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::Value;
use tower_sse::store::{StoreError, StoredEvent};

use crate::{entries, unavailable};

/// Renews the lease if `holder` has it.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Deletes the lease if `holder` has it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The most idle tail connections kept.
const MAX_IDLE: usize = 16;

/// Where tails get their dedicated connections.
pub(crate) struct Tails {
    client: redis::Client,
    idle: Mutex<Vec<MultiplexedConnection>>,
    timeout: Duration,
}

impl Tails {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> Self {
        Tails {
            client,
            idle: Mutex::new(Vec::new()),
            timeout,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<MultiplexedConnection>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.idle().pop() {
            return Ok(conn);
        }
        // No response timeout on the connection: a blocking read takes as long
        // as it blocks; `tail` bounds each read itself.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        match tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(StoreError::Unavailable("Redis timed out".into())),
        }
    }

    /// `XREAD BLOCK` on a dedicated connection, returned to the pool if it answered.
    pub(crate) async fn tail(
        &self,
        log: String,
        after_seq: u64,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut conn = self.connection().await?;
        // BLOCK 0 would wait forever.
        let block_ms = block.as_millis().clamp(1, u64::MAX as u128) as u64;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("BLOCK")
            .arg(block_ms)
            .arg("COUNT")
            .arg(limit.max(1))
            .arg("STREAMS")
            .arg(&log)
            .arg(crate::last_entry_id_of(after_seq));
        let reply =
            tokio::time::timeout(block + self.timeout, cmd.query_async::<Value>(&mut conn)).await;
        let value = match reply {
            Ok(Ok(v)) => v,
            // The connection is dropped, not pooled: it may be broken or still blocked.
            Ok(Err(e)) => return Err(unavailable(&e)),
            Err(_) => return Err(StoreError::Unavailable("Redis timed out".into())),
        };
        {
            let mut idle = self.idle();
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        Ok(stream_entries(&value))
    }
}

/// The entries of a one-stream XREAD reply (RESP2 array or RESP3 map; nil on timeout).
fn stream_entries(v: &Value) -> Vec<StoredEvent> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(StoreError::Unavailable("Redis timed out".into())),
    }
}

/// Takes the lease (`SET NX PX`) or renews it if `holder` has it.
pub(crate) async fn try_lease(
    conn: &ConnectionManager,
    timeout: Duration,
    key: String,
    holder: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
    let mut conn = conn.clone();
    let set: Value = bounded(
        timeout,
        redis::cmd("SET")
            .arg(&key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn),
    )
    .await?;
    if matches!(set, Value::Okay) {
        return Ok(true);
    }
    let renewed: i64 = bounded(
        timeout,
        redis::Script::new(RENEW)
            .key(&key)
            .arg(holder)
            .arg(ttl_ms)
            .invoke_async(&mut conn),
    )
    .await?;
    Ok(renewed == 1)
}

/// Deletes the lease if `holder` has it.
pub(crate) async fn release_lease(
    conn: &ConnectionManager,
    timeout: Duration,
    key: String,
    holder: &str,
) -> Result<(), StoreError> {
    let mut conn = conn.clone();
    let _: i64 = bounded(
        timeout,
        redis::Script::new(RELEASE)
            .key(&key)
            .arg(holder)
            .invoke_async(&mut conn),
    )
    .await?;
    Ok(())
}

/// The lease's holder, if any.
pub(crate) async fn lease_holder(
    conn: &ConnectionManager,
    timeout: Duration,
    key: String,
) -> Result<Option<String>, StoreError> {
    let mut conn = conn.clone();
    bounded(timeout, redis::cmd("GET").arg(&key).query_async(&mut conn)).await
}
