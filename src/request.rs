//! What every layer reads from a request: its stream key and `Last-Event-ID`.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};

use crate::body::{text_response, SseBody};
use crate::event::EventId;
use crate::key::{RequestHead, StreamKey};
use crate::registry::Registry;

/// The `Last-Event-ID` request header.
pub static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// A request's stream key and validated `Last-Event-ID`, resolved once per
/// request by the outermost tower-sse layer and kept in its extensions, so
/// every layer inside reads the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    /// The stream the request belongs to.
    pub key: StreamKey,
    /// The client's `Last-Event-ID`, validated; `None` when absent or empty.
    pub last_event_id: Option<EventId>,
}

impl SseRequest {
    /// Resolves the request's key and `Last-Event-ID`, caching them in its
    /// extensions. On bad input returns the `400 Bad Request` to answer with:
    /// a `Last-Event-ID` that is repeated, not UTF-8, holds CR, LF or NUL, or
    /// is longer than [`EventId::MAX_LEN`]; or a key the key maker refuses.
    /// Such a request is never forwarded.
    ///
    /// ```
    /// use tower_sse::{Registry, SseRequest};
    /// let registry = Registry::default();
    /// let mut req = http::Request::get("/events").header("last-event-id", "41").body(()).unwrap();
    /// let sse = SseRequest::resolve(&mut req, &registry).unwrap();
    /// assert_eq!(sse.last_event_id.unwrap().as_str(), "41");
    ///
    /// let mut bad = http::Request::get("/events")
    ///     .header("last-event-id", http::HeaderValue::from_bytes(b"4\x001").unwrap_or(http::HeaderValue::from_static("x")))
    ///     .body(()).unwrap();
    /// # let _ = &mut bad;
    /// ```
    pub fn resolve<B>(req: &mut Request<B>, registry: &Registry) -> Result<SseRequest, Refusal> {
        if let Some(sse) = req.extensions().get::<SseRequest>() {
            return Ok(sse.clone());
        }
        let key = registry
            .key_maker()
            .make_key(&RequestHead::of(req))
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let last_event_id = last_event_id(req.headers()).map_err(Refusal::bad_request)?;
        let sse = SseRequest { key, last_event_id };
        req.extensions_mut().insert(sse.clone());
        Ok(sse)
    }
}

/// A request a layer answers itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer with.
    pub status: StatusCode,
    /// Why, as plain text.
    pub reason: String,
}

impl Refusal {
    /// A `400 Bad Request`.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }

    /// The plain-text response.
    pub fn into_response(self) -> Response<SseBody> {
        text_response(self.status, self.reason)
    }
}

/// Reads and validates the `Last-Event-ID` header.
pub fn last_event_id(headers: &http::HeaderMap) -> Result<Option<EventId>, String> {
    let mut values = headers.get_all(&LAST_EVENT_ID).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Last-Event-ID header".into());
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Ok(None);
    }
    EventId::validate(bytes).map_err(|e| format!("invalid Last-Event-ID: {e}"))?;
    Ok(Some(
        EventId::new(bytes::Bytes::copy_from_slice(bytes)).map_err(|e| e.to_string())?,
    ))
}

/// The header values of `headers` copied into one buffer of their own.
///
/// A parsed request or response head shares its connection's read buffer
/// (8 KiB with hyper): a head kept for a stream's life (a proxy's request
/// template, a saved response head) would pin that buffer and make the
/// connection allocate another for its next read. One small allocation
/// instead.
///
/// ```
/// use http::HeaderMap;
/// let mut h = HeaderMap::new();
/// h.insert("content-type", "text/event-stream".parse().unwrap());
/// assert_eq!(tower_sse::detach_headers(&h), h);
/// ```
pub fn detach_headers(headers: &HeaderMap) -> HeaderMap {
    let len = headers.values().map(|v| v.len()).sum();
    let mut buf = bytes::BytesMut::with_capacity(len);
    for v in headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let mut buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, v) in headers {
        let copy = buf.split_to(v.len());
        let mut value = HeaderValue::from_maybe_shared(copy).unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name.clone(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(v: &[u8]) -> Result<Option<EventId>, String> {
        let mut h = http::HeaderMap::new();
        h.insert(&LAST_EVENT_ID, HeaderValue::from_bytes(v).unwrap());
        last_event_id(&h)
    }

    #[test]
    fn last_event_id_rules() {
        assert_eq!(with(b"12").unwrap().unwrap().as_str(), "12");
        assert_eq!(with(b"").unwrap(), None);
        assert!(with(b"\xff\xfe").is_err());
        assert!(with(&vec![b'a'; EventId::MAX_LEN + 1]).is_err());
        assert!(with(&vec![b'a'; EventId::MAX_LEN]).is_ok());
        // HeaderValue itself refuses CR, LF and NUL; a raw socket test covers the wire.
        assert!(HeaderValue::from_bytes(b"a\nb").is_err());
        let mut h = http::HeaderMap::new();
        h.append(&LAST_EVENT_ID, HeaderValue::from_static("1"));
        h.append(&LAST_EVENT_ID, HeaderValue::from_static("2"));
        assert!(last_event_id(&h).is_err());
    }
}
