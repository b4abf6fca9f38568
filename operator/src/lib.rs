//! The Walden operator: kube-rs controllers for `ContinuousBackup`, `Fork`
//! and `Follower` (design §1, §2, §7).

pub mod api;
pub mod controllers;
pub mod daemon_client;
pub mod leader;
pub mod metrics;
pub mod schedule;
pub mod server;
pub mod specs;
