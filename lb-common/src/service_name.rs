//! `LB_SERVICE_NAMES_V1`: service id -> the Kubernetes namespace, name and
//! port name the frontend was programmed from. Only the agent writes it and
//! only readers (`lbctl`, `bpftool`) use it; the programs never look at it.
//!
//! The fields are NUL-padded byte strings sized for every valid Kubernetes
//! object, so nothing real is cut: a namespace is a DNS-1123 label and a
//! Service name a DNS-1035 label (both at most 63 bytes), a port name an
//! IANA service name (at most 15 bytes). Longer input (an invalid object)
//! is truncated to the field's size minus one, so a value always ends in NUL.

use bytemuck::{Pod, Zeroable};

use crate::{assert_layout, user_pod};

/// Pinned name of the service-name map.
pub const NAME: &str = "LB_SERVICE_NAMES_V1";
/// Default capacity: one entry per frontend, as many as the service map.
pub const MAX_ENTRIES: u32 = crate::service::MAX_ENTRIES;

/// Bytes of [`LbServiceName::namespace`] (63 characters and a NUL).
pub const NAMESPACE_LEN: usize = 64;
/// Bytes of [`LbServiceName::name`] (63 characters and a NUL).
pub const SERVICE_NAME_LEN: usize = 64;
/// Bytes of [`LbServiceName::port_name`] (15 characters and a NUL).
pub const PORT_NAME_LEN: usize = 16;

/// Where a frontend came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct LbServiceName {
    /// `metadata.namespace` of the Service, NUL-padded.
    pub namespace: [u8; NAMESPACE_LEN],
    /// `metadata.name` of the Service, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// `spec.ports[].name`, NUL-padded; empty for a single unnamed port.
    pub port_name: [u8; PORT_NAME_LEN],
}
assert_layout!(
    LbServiceName,
    size = 144,
    namespace = 0,
    name = 64,
    port_name = 128
);

impl Default for LbServiceName {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl LbServiceName {
    /// Packs the three strings, truncating each to its field (see the
    /// module documentation).
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Self {
        let mut value = Self::default();
        pack(&mut value.namespace, namespace);
        pack(&mut value.name, name);
        pack(&mut value.port_name, port_name);
        value
    }

    /// The namespace, up to the first NUL (lossy for invalid UTF-8).
    pub fn namespace_bytes(&self) -> &[u8] {
        unpack(&self.namespace)
    }

    /// The service name, up to the first NUL.
    pub fn name_bytes(&self) -> &[u8] {
        unpack(&self.name)
    }

    /// The port name, up to the first NUL.
    pub fn port_name_bytes(&self) -> &[u8] {
        unpack(&self.port_name)
    }
}

fn pack(field: &mut [u8], value: &str) {
    // Keep the last byte NUL so readers always find the end.
    let len = value.len().min(field.len() - 1);
    field[..len].copy_from_slice(&value.as_bytes()[..len]);
}

fn unpack(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}

user_pod!(LbServiceName);
