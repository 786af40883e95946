//! The EndpointSlices of each Service: each slice names its Service in its
//! `kubernetes.io/service-name` label, and a change to a slice changes that Service only.

use std::collections::{BTreeSet, HashMap};

use crate::desired::{ByKey, ObjectKey, Problem, SERVICE_NAME_LABEL, ServiceName, Slice};

/// Which EndpointSlices belong to which Service, and which name none.
#[derive(Debug, Default)]
pub struct SliceIndex {
    /// The names of each Service's slices (they are in the Service's namespace).
    by_service: HashMap<ServiceName, ByKey<String>>,
    /// Slices without a Service label.
    unlabelled: BTreeSet<ObjectKey>,
}

impl SliceIndex {
    /// Files `slice` under the Service it names. Returns that Service.
    pub fn insert(&mut self, slice: &Slice) -> Option<ServiceName> {
        let key = ObjectKey::of(slice);
        match &slice.service {
            Some(service) => {
                self.unlabelled.remove(&key);
                let service = ServiceName::new(key.namespace, service.clone());
                self.by_service.entry(service.clone()).or_default().insert(key.name);
                Some(service)
            }
            None => {
                self.unlabelled.insert(key);
                None
            }
        }
    }

    /// Takes `slice` out of the slices of `service`, the Service it was filed under (`None`:
    /// none). Returns that Service.
    pub fn remove(&mut self, slice: &Slice, service: Option<&str>) -> Option<ServiceName> {
        let key = ObjectKey::of(slice);
        self.unlabelled.remove(&key);
        let service = ServiceName::new(key.namespace, service?);
        if let Some(names) = self.by_service.get_mut(&service) {
            names.remove(&key.name);
            if names.is_empty() {
                self.by_service.remove(&service);
            }
        }
        Some(service)
    }

    /// Files every slice anew.
    pub fn rebuild<'a>(&mut self, slices: impl IntoIterator<Item = &'a Slice>) {
        self.by_service.clear();
        self.unlabelled.clear();
        for slice in slices {
            self.insert(slice);
        }
    }

    /// The keys of the slices of `service`.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ServiceName,
    ) -> impl Iterator<Item = ObjectKey> + 'a {
        let names = self.by_service.get(service).into_iter().flatten();
        names.map(|name| ObjectKey::new(service.namespace.clone(), name.clone()))
    }

    /// Every Service some slice names.
    pub fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.by_service.keys()
    }

    /// The slices that name no Service, reported: they are skipped.
    pub fn problems(&self) -> impl Iterator<Item = Problem> + '_ {
        self.unlabelled.iter().map(|key| Problem {
            object: format!("EndpointSlice {key}"),
            reason: format!("has no {SERVICE_NAME_LABEL} label; skipped"),
        })
    }
}
