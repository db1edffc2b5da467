//! The crate's errors.

use std::error::Error;
use std::fmt;

/// A configuration [`WsLayerBuilder::build`](crate::WsLayerBuilder::build)
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// The path does not start with `/`.
    InvalidPath(String),
    /// An allowed origin is not of the form `scheme://host[:port]`.
    InvalidOrigin(String),
    /// `"*"` was given as an allowed origin; allowing every origin is
    /// [`allow_any_origin`](crate::WsLayerBuilder::allow_any_origin).
    WildcardOrigin,
    /// A duration or size that must be positive is zero.
    Zero(&'static str),
    /// The trusted proxy header is not a valid header name.
    InvalidHeaderName(String),
    /// `history_bytes` is larger than `max_queued_bytes`: replaying a full
    /// history would overflow a new subscriber's queue.
    HistoryExceedsQueue,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPath(path) => write!(f, "path {path:?} does not start with '/'"),
            Self::InvalidOrigin(origin) => {
                write!(
                    f,
                    "allowed origin {origin:?} is not of the form scheme://host[:port]"
                )
            }
            Self::WildcardOrigin => {
                f.write_str("\"*\" is not an origin; call allow_any_origin() to allow every origin")
            }
            Self::Zero(what) => write!(f, "{what} must be greater than zero"),
            Self::InvalidHeaderName(name) => write!(f, "{name:?} is not a valid header name"),
            Self::HistoryExceedsQueue => {
                f.write_str("history bytes must not exceed max queued bytes")
            }
        }
    }
}

impl Error for BuildError {}

/// Why [`Publisher::publish`](crate::Publisher::publish) sent nothing.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishError {
    /// The message could not be serialized as JSON (for example a map with
    /// keys that are not strings).
    Serialize(SerializeError),
    /// The message is not a JSON object. Topic messages must be objects:
    /// each one gets a `"seq"` field.
    NotAnObject,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serialize(_) => f.write_str("message could not be serialized as JSON"),
            Self::NotAnObject => f.write_str("message is not a JSON object"),
        }
    }
}

impl Error for PublishError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Serialize(e) => Some(e),
            Self::NotAnObject => None,
        }
    }
}

/// The serializer's own description of why a message is not JSON.
pub struct SerializeError(serde_json::Error);

impl fmt::Debug for SerializeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SerializeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for SerializeError {}

impl PublishError {
    pub(crate) fn serialize(e: serde_json::Error) -> Self {
        Self::Serialize(SerializeError(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase_and_source_is_kept() {
        let e = PublishError::serialize(serde_json::from_str::<u8>("x").unwrap_err());
        assert!(e.to_string().starts_with("message"));
        assert!(e.source().is_some());
        assert!(BuildError::Zero("heartbeat")
            .to_string()
            .starts_with("heartbeat"));
    }
}
