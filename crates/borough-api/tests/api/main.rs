//! HTTP-level tests of the NGSI-LD API against the real router and a real
//! embedded store.

mod batch;
mod common;
mod conformance;
mod contexts;
mod csource;
mod entities;
mod errors;
mod geo;
mod outbound;
mod query;
mod registry;
mod subscriptions;
mod temporal;
mod tenants;
