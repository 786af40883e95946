//! Support code for the VM tests.
