//! Stream keys: which logical stream a request belongs to.
//!
//! A stream key names **one consumer's** stream: the cursor, the dedup window
//! and the history are kept per key. The default key is the request's path and
//! query, right when each URL has one consumer; when many clients share a URL,
//! key by session (a header, a cookie or a query parameter; browsers'
//! `EventSource` cannot set headers, so cookie and query work too), or by a closure.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, Uri};

/// The longest accepted session value, in bytes.
pub const MAX_SESSION_LEN: usize = 256;
/// The longest accepted resource part of a key (path and query), in bytes.
pub const MAX_RESOURCE_LEN: usize = 4096;

/// Identifies a stream: an optional session and a resource (path, with the query when no session is used).
#[derive(Clone, Eq)]
pub struct StreamKey {
    session: Option<Arc<str>>,
    resource: Arc<str>,
}

/// Equal text, with clones of one key (the usual case in a map lookup)
/// recognised by pointer, without reading the text.
impl PartialEq for StreamKey {
    fn eq(&self, other: &Self) -> bool {
        fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        same(&self.resource, &other.resource)
            && match (&self.session, &other.session) {
                (None, None) => true,
                (Some(a), Some(b)) => same(a, b),
                _ => false,
            }
    }
}

impl std::hash::Hash for StreamKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.session.hash(state);
        self.resource.hash(state);
    }
}

impl Ord for StreamKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.session, &self.resource).cmp(&(&other.session, &other.resource))
    }
}

impl PartialOrd for StreamKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl StreamKey {
    /// A key for `resource` without a session. Fails on a value a key may not hold.
    ///
    /// ```
    /// use tower_sse::StreamKey;
    /// let key = StreamKey::new("/events?topic=a").unwrap();
    /// assert_eq!(key.resource(), "/events?topic=a");
    /// assert!(StreamKey::new("/a\nb").is_err());
    /// ```
    pub fn new(resource: &str) -> Result<Self, KeyError> {
        validate(resource, MAX_RESOURCE_LEN, KeyError::BadResource)?;
        Ok(StreamKey {
            session: None,
            resource: Arc::from(resource),
        })
    }

    /// A key for `resource` within `session`.
    ///
    /// ```
    /// use tower_sse::StreamKey;
    /// let key = StreamKey::with_session("abc", "/mcp").unwrap();
    /// assert_eq!(key.session(), Some("abc"));
    /// assert!(StreamKey::with_session("a b", "/mcp").is_err());
    /// ```
    pub fn with_session(session: &str, resource: &str) -> Result<Self, KeyError> {
        validate(session, MAX_SESSION_LEN, KeyError::BadSession)?;
        validate(resource, MAX_RESOURCE_LEN, KeyError::BadResource)?;
        Ok(StreamKey {
            session: Some(Arc::from(session)),
            resource: Arc::from(resource),
        })
    }

    /// The session, when the key has one.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// The resource part (path, and query when no session is used).
    pub fn resource(&self) -> &str {
        &self.resource
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.session {
            Some(s) => write!(f, "{s}@{}", self.resource),
            None => f.write_str(&self.resource),
        }
    }
}

impl fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamKey({self})")
    }
}

/// Visible ASCII only (0x21..=0x7E), non-empty, bounded: nothing a log, a
/// header or a store key could be confused by.
fn validate(value: &str, max: usize, err: KeyError) -> Result<(), KeyError> {
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(err);
    }
    Ok(())
}

/// Why a request has no valid stream key. Layers answer it with `400 Bad Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The session value is empty, too long, or not visible ASCII.
    #[error("invalid session identifier (1 to 256 visible ASCII characters)")]
    BadSession,
    /// The path and query are too long or hold characters a key may not hold.
    #[error("invalid stream resource (at most 4096 visible ASCII characters)")]
    BadResource,
    /// A session is required and the request carries none.
    #[error("missing session identifier")]
    MissingSession,
}

/// The parts of a request a key is made from.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request URI.
    pub uri: &'a Uri,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestHead<'a> {
    /// Borrows the head of a request.
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }
}

/// Makes the stream key of a request. Implemented by [`KeyBy`] and by closures
/// `Fn(&RequestHead) -> Result<StreamKey, KeyError>`.
pub trait MakeStreamKey: Send + Sync + 'static {
    /// The key of this request.
    fn make_key(&self, head: &RequestHead<'_>) -> Result<StreamKey, KeyError>;
}

impl<F> MakeStreamKey for F
where
    F: Fn(&RequestHead<'_>) -> Result<StreamKey, KeyError> + Send + Sync + 'static,
{
    fn make_key(&self, head: &RequestHead<'_>) -> Result<StreamKey, KeyError> {
        self(head)
    }
}

/// The built-in ways to key a stream.
///
/// With a session source, the key is the session and the request path (the
/// query is left out, so cache-busting parameters do not split a session's
/// stream); a request without the session falls back to path and query,
/// unless [`KeyBy::required`] is set, in which case it gets 400.
///
/// ```
/// use tower_sse::{KeyBy, MakeStreamKey, RequestHead};
/// let req = http::Request::get("/events?x=1")
///     .header("cookie", "theme=dark; sid=abc123")
///     .body(())
///     .unwrap();
/// let key = KeyBy::cookie("sid").make_key(&RequestHead::of(&req)).unwrap();
/// assert_eq!(key.session(), Some("abc123"));
/// assert_eq!(key.resource(), "/events");
/// ```
#[derive(Debug, Clone)]
pub struct KeyBy {
    source: Source,
    required: bool,
}

#[derive(Debug, Clone)]
enum Source {
    PathAndQuery,
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

impl Default for KeyBy {
    fn default() -> Self {
        KeyBy::path_and_query()
    }
}

impl KeyBy {
    /// Path and query (the default).
    pub fn path_and_query() -> Self {
        KeyBy {
            source: Source::PathAndQuery,
            required: false,
        }
    }

    /// A session from a request header, such as `Mcp-Session-Id`.
    pub fn header(name: HeaderName) -> Self {
        KeyBy {
            source: Source::Header(name),
            required: false,
        }
    }

    /// A session from a cookie.
    pub fn cookie(name: impl Into<String>) -> Self {
        KeyBy {
            source: Source::Cookie(name.into()),
            required: false,
        }
    }

    /// A session from a query parameter.
    pub fn query(name: impl Into<String>) -> Self {
        KeyBy {
            source: Source::Query(name.into()),
            required: false,
        }
    }

    /// Answers 400 to a request without the session instead of keying it by path and query.
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    fn session<'a>(&self, head: &RequestHead<'a>) -> Result<Option<&'a str>, KeyError> {
        match &self.source {
            Source::PathAndQuery => Ok(None),
            Source::Header(name) => match head.headers.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(Some).map_err(|_| KeyError::BadSession),
            },
            // Cookie headers are parsed as bytes: another cookie's non-ASCII
            // value must neither hide the session nor let a bad one pass.
            Source::Cookie(name) => {
                let found = head
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
                    .filter_map(|pair| {
                        let eq = pair.iter().position(|b| *b == b'=')?;
                        Some((pair[..eq].trim_ascii(), &pair[eq + 1..]))
                    })
                    .find(|(k, _)| *k == name.as_bytes())
                    .map(|(_, v)| v.trim_ascii());
                match found {
                    None => Ok(None),
                    Some(v) => std::str::from_utf8(v)
                        .map(|v| Some(v.trim_matches('"')))
                        .map_err(|_| KeyError::BadSession),
                }
            }
            Source::Query(name) => Ok(head.uri.query().and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v)
            })),
        }
    }
}

impl MakeStreamKey for KeyBy {
    fn make_key(&self, head: &RequestHead<'_>) -> Result<StreamKey, KeyError> {
        match self.session(head)? {
            Some(session) => StreamKey::with_session(session, head.uri.path()),
            None if self.required => Err(KeyError::MissingSession),
            None => {
                let resource = head
                    .uri
                    .path_and_query()
                    .map_or(head.uri.path(), |pq| pq.as_str());
                StreamKey::new(resource)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(req: &http::Request<()>) -> RequestHead<'_> {
        RequestHead::of(req)
    }

    #[test]
    fn default_is_path_and_query() {
        let req = http::Request::get("/a/b?c=d").body(()).unwrap();
        let key = KeyBy::default().make_key(&head_of(&req)).unwrap();
        assert_eq!(key.resource(), "/a/b?c=d");
        assert_eq!(key.session(), None);
    }

    #[test]
    fn header_session() {
        let req = http::Request::get("/mcp?x")
            .header("mcp-session-id", "s-1")
            .body(())
            .unwrap();
        let by = KeyBy::header(HeaderName::from_static("mcp-session-id"));
        let key = by.make_key(&head_of(&req)).unwrap();
        assert_eq!(key.to_string(), "s-1@/mcp");
    }

    #[test]
    fn query_session_and_required() {
        let req = http::Request::get("/e?a=1&sid=zz").body(()).unwrap();
        let key = KeyBy::query("sid").make_key(&head_of(&req)).unwrap();
        assert_eq!(key.session(), Some("zz"));
        let req = http::Request::get("/e?a=1").body(()).unwrap();
        assert_eq!(
            KeyBy::query("sid").required().make_key(&head_of(&req)),
            Err(KeyError::MissingSession)
        );
        // Without `required`, the request falls back to path and query.
        assert_eq!(
            KeyBy::query("sid")
                .make_key(&head_of(&req))
                .unwrap()
                .resource(),
            "/e?a=1"
        );
    }

    #[test]
    fn hostile_sessions_are_refused() {
        for bad in ["", "a b", "a\u{7f}", &"x".repeat(MAX_SESSION_LEN + 1), "é"] {
            assert_eq!(
                StreamKey::with_session(bad, "/"),
                Err(KeyError::BadSession),
                "{bad:?}"
            );
        }
        let req = http::Request::get("/")
            .header(
                "mcp-session-id",
                http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
            )
            .body(())
            .unwrap();
        let by = KeyBy::header(HeaderName::from_static("mcp-session-id"));
        assert_eq!(by.make_key(&head_of(&req)), Err(KeyError::BadSession));
    }

    #[test]
    fn cookies_are_parsed_as_bytes() {
        let by = KeyBy::cookie("sid");
        let req = http::Request::get("/e")
            .header(
                "cookie",
                http::HeaderValue::from_bytes(b"pref=caf\xc3\xa9; sid=s1").unwrap(),
            )
            .body(())
            .unwrap();
        assert_eq!(by.make_key(&head_of(&req)).unwrap().session(), Some("s1"));
        let req = http::Request::get("/e")
            .header(
                "cookie",
                http::HeaderValue::from_bytes(b"sid=caf\xc3\xa9").unwrap(),
            )
            .body(())
            .unwrap();
        assert_eq!(by.make_key(&head_of(&req)), Err(KeyError::BadSession));
    }

    #[test]
    fn closure_keys() {
        let by = |h: &RequestHead<'_>| StreamKey::with_session("fixed", h.uri.path());
        let req = http::Request::get("/p").body(()).unwrap();
        assert_eq!(by.make_key(&head_of(&req)).unwrap().to_string(), "fixed@/p");
    }
}
