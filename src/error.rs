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
    /// The backplane is already in use by another layer that still exists;
    /// each layer needs its own.
    BackplaneInUse,
    /// The compression level is not between 1 and 9.
    CompressionLevel(u32),
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
            Self::BackplaneInUse => f.write_str("backplane is already used by another layer"),
            Self::HistoryExceedsQueue => {
                f.write_str("history bytes must not exceed max queued bytes")
            }
            Self::CompressionLevel(level) => {
                write!(f, "compression level {level} is not between 1 and 9")
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
    /// The object has a `"seq"` field of its own: `seq` is the layer's,
    /// and a client would read one of the two and resume from the wrong
    /// place.
    SeqField,
    /// The layer's backplane did not take the message, or could not
    /// confirm it (see [`BackplaneError`]).
    Backplane(BackplaneError),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serialize(_) => f.write_str("message could not be serialized as JSON"),
            Self::NotAnObject => f.write_str("message is not a JSON object"),
            Self::SeqField => f.write_str("message has a \"seq\" field, which the layer sets"),
            Self::Backplane(_) => {
                f.write_str("message could not be published through the backplane")
            }
        }
    }
}

impl Error for PublishError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Serialize(e) => Some(e),
            Self::NotAnObject | Self::SeqField => None,
            Self::Backplane(e) => Some(e),
        }
    }
}

/// What went wrong between this instance and its backplane.
///
/// For a publish, [`Unavailable`](Self::Unavailable) and
/// [`Overloaded`](Self::Overloaded) mean nothing was published.
/// [`Failed`](Self::Failed) after a publish was sent means its outcome is
/// unknown: the backplane may have numbered and broadcast it before the
/// connection broke.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackplaneError {
    /// The connection to the backplane is down; it is being re-established.
    Unavailable,
    /// More publishes are waiting for the backplane than its queue holds.
    Overloaded,
    /// The backplane refused a command, or the connection broke while one
    /// was under way.
    Failed(Box<dyn Error + Send + Sync>),
    /// The backplane's address or settings are not usable.
    InvalidConfig(String),
}

impl fmt::Display for BackplaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => f.write_str("backplane is unavailable"),
            Self::Overloaded => f.write_str("backplane queue is full"),
            Self::Failed(_) => f.write_str("backplane command failed"),
            Self::InvalidConfig(why) => write!(f, "invalid backplane configuration: {why}"),
        }
    }
}

impl Error for BackplaneError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Failed(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<BackplaneError> for PublishError {
    fn from(e: BackplaneError) -> Self {
        Self::Backplane(e)
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
