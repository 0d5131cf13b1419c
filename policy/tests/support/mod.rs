//! Shared test support: the reference evaluator and the scenario file format.
#![allow(dead_code)]

pub mod reference;
pub mod scenario;
