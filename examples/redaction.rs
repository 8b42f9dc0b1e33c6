//! Cookbook: redaction — an interceptor that rewrites an event's data before
//! it reaches the client, masking e-mail addresses.
//!
//! [`Event::set_data`] re-encodes the event (its ID and type are kept), so the
//! client, the stream's cursor and any store see only the redacted event.
//!
//! ```text
//! DATA='write to bob@example.com ({n})' cargo run --example redaction
//! curl -N localhost:PORT/events
//! ```

mod common;

use axum::routing::get;
use axum::Router;
use tower_sse::{Decision, Event, EventContext, Interceptor, Registry};
use tower_sse_track::TrackLayer;

/// Masks anything shaped like `local@domain.tld`.
struct MaskEmails;

fn is_email_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

/// Replaces each e-mail address in `text` with `[redacted]`; `None` if there is none.
fn mask_emails(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        let local_start = rest[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_email_char(*c))
            .last()
            .map_or(at, |(i, _)| i);
        let domain_len = rest[at + 1..]
            .char_indices()
            .take_while(|(_, c)| is_email_char(*c))
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
        let domain = rest[at + 1..at + 1 + domain_len].trim_end_matches('.');
        if local_start < at && domain.contains('.') {
            out.push_str(&rest[..local_start]);
            out.push_str("[redacted]");
            rest = &rest[at + 1 + domain.len()..];
            changed = true;
        } else {
            out.push_str(&rest[..=at]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

impl Interceptor for MaskEmails {
    fn on_event(&self, _cx: &EventContext<'_>, event: &mut Event) -> Decision {
        let masked = mask_emails(&event.data());
        if let Some(masked) = masked {
            event.set_data(&masked);
        }
        Decision::Deliver
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Registry::builder().interceptor(MaskEmails).build();
    let app = Router::new()
        .route("/events", get(common::demo_events))
        .layer(TrackLayer::new(registry));
    common::serve(app).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn masks() {
        use super::mask_emails;
        assert_eq!(
            mask_emails("a bob@example.com b").unwrap(),
            "a [redacted] b"
        );
        assert_eq!(
            mask_emails("x@y.io, z@w.org.").unwrap(),
            "[redacted], [redacted]."
        );
        assert_eq!(mask_emails("no at sign"), None);
        assert_eq!(mask_emails("@handle and a@b"), None);
    }
}
