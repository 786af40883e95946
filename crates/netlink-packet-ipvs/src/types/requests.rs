//! The messages that change the kernel's table, built from the typed model.

use std::net::SocketAddr;

use super::{Destination, ServiceKey, VirtualService};
use crate::message::{IpvsAttribute, IpvsCommand, IpvsMessage};

fn service(service: &VirtualService) -> IpvsAttribute {
    IpvsAttribute::Service(service.to_attributes())
}

fn key(key: &ServiceKey) -> IpvsAttribute {
    IpvsAttribute::Service(key.to_attributes())
}

fn destination(destination: &Destination) -> IpvsAttribute {
    IpvsAttribute::Destination(destination.to_attributes())
}

impl IpvsMessage {
    /// `NEW_SERVICE`: add a virtual service.
    pub fn new_service(virtual_service: &VirtualService) -> Self {
        Self::new(IpvsCommand::NewService, vec![service(virtual_service)])
    }

    /// `SET_SERVICE`: change a virtual service's scheduler, flags, timeout or netmask.
    pub fn set_service(virtual_service: &VirtualService) -> Self {
        Self::new(IpvsCommand::SetService, vec![service(virtual_service)])
    }

    /// `DEL_SERVICE`: delete a virtual service and its destinations.
    pub fn del_service(service: &ServiceKey) -> Self {
        Self::new(IpvsCommand::DelService, vec![key(service)])
    }

    /// `NEW_DEST`: add a destination to a virtual service.
    pub fn new_dest(service: &ServiceKey, dest: &Destination) -> Self {
        Self::new(IpvsCommand::NewDest, vec![key(service), destination(dest)])
    }

    /// `SET_DEST`: change a destination's forwarding method, weight or thresholds.
    pub fn set_dest(service: &ServiceKey, dest: &Destination) -> Self {
        Self::new(IpvsCommand::SetDest, vec![key(service), destination(dest)])
    }

    /// `DEL_DEST`: delete a destination.
    pub fn del_dest(service: &ServiceKey, address: SocketAddr) -> Self {
        let dest = IpvsAttribute::Destination(Destination::key_attributes(address));
        Self::new(IpvsCommand::DelDest, vec![key(service), dest])
    }
}
