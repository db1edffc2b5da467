//! Sharing topics between instances through a backplane.
//!
//! Without a backplane, the [`Hub`](crate::hub::Hub) numbers each topic's
//! messages and keeps their history itself. With one, the backplane does:
//! a publish goes to the backplane, which gives it the topic's next `seq`,
//! keeps it in the topic's history and broadcasts it to every instance
//! listening to the topic. Each instance listens only to the topics its own
//! clients subscribe to, and keeps a copy of each (see
//! [`crate::replica`]) that it fills from the broadcast, from the replies
//! to its own publishes, and from the backplane's history when it starts
//! listening, or listens again after a reconnect.
//!
//! The hub talks to a backplane through [`Relay`]; the one implementation
//! is [`RedisBackplane`] (feature `redis`).

// Without the `redis` feature no backplane exists to drive this.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use tokio::sync::oneshot;

use crate::error::PublishError;
use crate::message::Draft;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod wire;

#[cfg(feature = "redis")]
pub use self::redis::{RedisBackplane, RedisBackplaneBuilder};

/// Where the outcome of one publish is sent: its `seq`, or why it failed.
pub(crate) type Ack = oneshot::Sender<Result<u64, PublishError>>;

/// What the hub asks of a backplane. None of these wait: each hands work
/// to the backplane's own tasks.
pub(crate) trait Relay: Send + Sync + 'static {
    /// Hands a message to the backplane to be numbered and broadcast. An
    /// error means it was not taken (nothing was published); a failure
    /// after that goes to `ack`, and is counted and logged either way.
    fn publish(
        &self,
        topic: &str,
        draft: Draft,
        done: bool,
        ack: Option<Ack>,
    ) -> Result<(), PublishError>;

    /// Marks a topic's stream finished in the backplane's history.
    fn complete(&self, topic: &str);

    /// Reads a topic's history after its copy's head (see
    /// [`Hub::fetch_cursor`](crate::hub::Hub::fetch_cursor)) and hands it
    /// to [`Hub::fetched`](crate::hub::Hub::fetched).
    fn fetch(&self, topic: &str);

    /// Starts listening to a topic that now has local subscribers, then
    /// fetches its history.
    fn listen(&self, topic: &str);

    /// Stops listening to a topic that no longer has local subscribers.
    fn unlisten(&self, topic: &str);
}

/// A message numbered by the backplane.
pub(crate) struct Numbered {
    /// The numbering it belongs to: a topic the backplane lost and began
    /// again has a new, larger epoch.
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    /// Whether the topic's stream is finished with (or before) it.
    pub(crate) done: bool,
    /// `None` if what the backplane held is not a JSON object: its number
    /// is used up and nothing is delivered.
    pub(crate) draft: Option<Draft>,
}

/// What the backplane's history held for a topic.
pub(crate) struct Fetched {
    /// `None` if it holds nothing for the topic.
    pub(crate) epoch: Option<u64>,
    /// In `seq` order: everything after the copy's last `seq` if the epoch
    /// is the copy's, else everything held.
    pub(crate) entries: Vec<Numbered>,
}
