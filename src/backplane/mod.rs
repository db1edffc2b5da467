//! Sharing topics between instances through a backplane.
//!
//! Without a backplane, the [`Hub`](crate::hub::Hub) numbers each topic's
//! messages and keeps their history itself. With one, the backplane does:
//! a publish goes to the backplane, which gives it the topic's next `seq`,
//! keeps it in the topic's history and broadcasts it to every instance
//! listening to the topic. Each instance listens only to the topics its own
//! clients subscribe to, and keeps a copy of each (see
//! the hub's `replica` module) that it fills from the broadcast, from the replies
//! to its own publishes, and from the backplane's history when it starts
//! listening, or listens again after a reconnect.
//!
//! The hub talks to a backplane through its `Relay` trait; the one
//! implementation is [`RedisBackplane`]. This module depends on the hub,
//! never the reverse, and exists only with the `redis` feature.

mod cluster;
mod redis;
mod wire;

pub use self::redis::{RedisBackplane, RedisBackplaneBuilder};
