//! Empty library target: lets `lb-agent` name this crate as a build
//! dependency, so cargo rebuilds the agent when the kernel programs change.
#![no_std]
