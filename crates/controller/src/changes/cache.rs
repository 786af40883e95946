//! The objects of one kind as the last watch events left them, shared (by `Arc`) with the
//! source that sent them: a manifests directory and the cache hold one copy between them.

use std::{collections::HashMap, sync::Arc};

use kube::runtime::{reflector::Lookup, watcher::Event};

use crate::desired::ObjectKey;

/// The objects of one kind, keyed by namespace and name: a relist (`Init`, `InitApply`…,
/// `InitDone`) is gathered aside and replaces the objects when it is done, so that the
/// objects never stand half listed.
#[derive(Debug)]
pub struct Cache<K> {
    objects: HashMap<ObjectKey, Arc<K>>,
    relist: HashMap<ObjectKey, Arc<K>>,
    listed: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self { objects: HashMap::new(), relist: HashMap::new(), listed: false }
    }
}

impl<K: Lookup> Cache<K> {
    /// Takes one watch event in.
    pub fn apply(&mut self, event: &Event<Arc<K>>) {
        match event {
            Event::Apply(object) => {
                self.objects.insert(ObjectKey::of(object.as_ref()), object.clone());
            }
            Event::Delete(object) => {
                self.objects.remove(&ObjectKey::of(object.as_ref()));
            }
            Event::Init => self.relist.clear(),
            Event::InitApply(object) => {
                self.relist.insert(ObjectKey::of(object.as_ref()), object.clone());
            }
            Event::InitDone => {
                self.objects = std::mem::take(&mut self.relist);
                self.listed = true;
            }
        }
    }

    /// The object with this key.
    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<K>> {
        self.objects.get(key)
    }

    /// Every object.
    pub fn objects(&self) -> impl Iterator<Item = &Arc<K>> {
        self.objects.values()
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Whether a whole list has been taken in once.
    pub fn listed(&self) -> bool {
        self.listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::ServiceInfo;
    use k8s_openapi::api::core::v1::Service;

    fn service(name: &str, ip: &str) -> Arc<ServiceInfo> {
        let mut object = Service::default();
        object.metadata.name = Some(name.into());
        object.metadata.namespace = Some("ns".into());
        object.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some(ip.into()),
            ..Default::default()
        });
        Arc::new(ServiceInfo::from(object))
    }

    #[test]
    fn a_relist_replaces_the_objects_only_when_it_is_done() {
        let mut cache = Cache::default();
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(service("a", "10.96.0.1")));
        assert!(cache.is_empty() && !cache.listed(), "a list is not used half done");
        cache.apply(&Event::InitDone);
        assert!(cache.listed());
        let a = cache.get(&ObjectKey::new("ns", "a")).unwrap().clone();
        cache.apply(&Event::Apply(service("b", "10.96.0.2")));
        assert_eq!(cache.len(), 2);

        // A relist after 410 Gone: `a` changed, `b` is gone, and both stay until it is done.
        cache.apply(&Event::Init);
        let changed = service("a", "10.96.0.3");
        cache.apply(&Event::InitApply(changed.clone()));
        assert!(Arc::ptr_eq(cache.get(&ObjectKey::new("ns", "a")).unwrap(), &a));
        assert!(cache.get(&ObjectKey::new("ns", "b")).is_some());
        cache.apply(&Event::InitDone);
        assert!(
            Arc::ptr_eq(cache.get(&ObjectKey::new("ns", "a")).unwrap(), &changed),
            "the object is shared"
        );
        assert!(cache.get(&ObjectKey::new("ns", "b")).is_none());
        cache.apply(&Event::Delete(changed));
        assert!(cache.is_empty() && cache.objects().next().is_none());
    }
}
