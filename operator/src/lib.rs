//! The Walden operator: kube-rs controllers for `ContinuousBackup`, `Fork`
//! and `Follower` (design §1, §2, §7).

pub mod api;
