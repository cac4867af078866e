//! Borough's core: the NGSI-LD model, `@context` processing, validation, the
//! write operations and the problem types. Plain Rust with no I/O, so that it
//! can be tested exhaustively and shared by every storage backend and front end.

pub mod context;
pub mod entity;
pub mod error;
pub mod geojson;
pub mod ops;
pub mod query;
pub mod registration;
pub mod render;
pub mod subscription;
pub mod temporal;
pub mod validate;

pub use context::Context;
pub use entity::{
    AttrKind, AttrPatch, Attribute, Entity, Format, Fragment, ParseMode, RenderOptions,
};
pub use error::{NgsiError, NgsiResult, ProblemKind};
pub use ops::{Change, EntityOp, NotUpdated, OpOutcome};
