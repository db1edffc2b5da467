//! The topics one connection is subscribed to.

use std::collections::HashSet;
use std::sync::Arc;

/// The topics one connection (a socket or an event stream) is subscribed
/// to, by the hub's names for them. Most connections follow one topic, so
/// one is kept without a table, and a table is boxed: this sits in every
/// connection's state.
#[derive(Default)]
pub(crate) struct Subscriptions(Topics);

#[derive(Default)]
enum Topics {
    #[default]
    None,
    One(Arc<str>),
    #[allow(
        clippy::box_collection,
        reason = "boxed, the set's 48 bytes are only held by connections with several topics"
    )]
    Many(Box<HashSet<Arc<str>>>),
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        match &self.0 {
            Topics::None => 0,
            Topics::One(_) => 1,
            Topics::Many(set) => set.len(),
        }
    }

    pub(crate) fn contains(&self, topic: &str) -> bool {
        match &self.0 {
            Topics::None => false,
            Topics::One(one) => **one == *topic,
            Topics::Many(set) => set.contains(topic),
        }
    }

    /// Adds `topic`; `false` if it was there already.
    pub(crate) fn insert(&mut self, topic: Arc<str>) -> bool {
        match &mut self.0 {
            Topics::None => self.0 = Topics::One(topic),
            Topics::One(one) if *one == topic => return false,
            Topics::One(one) => {
                let set = HashSet::from([one.clone(), topic]);
                self.0 = Topics::Many(Box::new(set));
            }
            Topics::Many(set) => return set.insert(topic),
        }
        true
    }

    /// Removes `topic`; `false` if it was not there.
    pub(crate) fn remove(&mut self, topic: &str) -> bool {
        match &mut self.0 {
            Topics::One(one) if **one == *topic => self.0 = Topics::None,
            Topics::Many(set) => return set.remove(topic),
            Topics::None | Topics::One(_) => return false,
        }
        true
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        let (one, many) = match &self.0 {
            Topics::None => (None, None),
            Topics::One(one) => (Some(one), None),
            Topics::Many(set) => (None, Some(&**set)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_then_many_then_none() {
        let mut topics = Subscriptions::default();
        assert!(topics.insert("a".into()));
        assert!(!topics.insert("a".into()));
        assert!(topics.contains("a") && !topics.contains("b"));
        assert!(topics.insert("b".into()));
        assert!(topics.insert("c".into()));
        assert_eq!(topics.len(), 3);
        let mut all: Vec<_> = topics.iter().map(|t| t.to_string()).collect();
        all.sort();
        assert_eq!(all, ["a", "b", "c"]);
        assert!(topics.remove("b") && !topics.remove("b"));
        assert_eq!(topics.len(), 2);

        let mut one = Subscriptions::default();
        one.insert("a".into());
        assert!(!one.remove("b"));
        assert!(one.remove("a"));
        assert_eq!((one.len(), one.iter().count()), (0, 0));
    }
}
