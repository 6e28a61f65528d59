//! The fleet service: clinics and their devices, case sync, and
//! retrieval-augmented answers, on PostgreSQL with pgvector.
//!
//! # Design notes
//!
//! * Stateless: everything a request needs is in the database or in the
//!   request, so any number of instances can serve the same devices.
//! * A device sees its own clinic's cases and the shared reference library,
//!   nothing else; every query that reads cases is scoped by the clinic of
//!   the authenticated device, never by anything the request says.
//! * Nothing acknowledged is lost: an upload is answered only after its
//!   transaction committed; a retried batch is answered from
//!   `case_revisions` without writing.
//! * Refusals are [`error::ApiError`]s: an HTTP status and a JSON
//!   `{code, message}` body (`dermascope_cloud_api::ErrorBody`).
//! * No patient identifiers reach the vision-language model or the logs.
//!
//! Architecture Invariant: the device's crates never depend on this one
//! (only on `dermascope-cloud-api`); tests and benchmarks may.

pub mod auth;
pub mod cases;
pub mod config;
pub mod db;
pub mod error;
pub mod fleet;
pub mod operator;
pub mod rag;
pub mod server;
pub mod web;
