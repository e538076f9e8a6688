//! The two personas as goose scenarios. Both run the same life (`user.rs`): join on start, tick
//! until the run stops, leave on stop. They differ in role and publish rate, which their seat
//! (`plan.rs`) carries: a **host** publishes at the host rate, a **viewer** watches and chats at
//! the viewer rate.

use std::sync::Arc;

use goose::prelude::*;

use crate::plan::Role;
use crate::shared::Shared;
use crate::user;

/// The scenario of `role` with `weight` users (the number of members of that role, so that
/// goose's allocation, which repeats the weights, hands out exactly the planned seats).
pub fn scenario(shared: &Arc<Shared>, role: Role, weight: usize) -> Result<Scenario, GooseError> {
    let (name, join_name) = match role {
        Role::Host => ("host", "host join"),
        Role::Viewer => ("viewer", "viewer join"),
    };
    let s = shared.clone();
    let join: TransactionFunction = Arc::new(move |u| {
        let s = s.clone();
        Box::pin(async move { user::join(u, &s, role).await })
    });
    let s = shared.clone();
    let tick: TransactionFunction = Arc::new(move |u| {
        let s = s.clone();
        Box::pin(async move { user::tick(u, &s).await })
    });
    let s = shared.clone();
    let leave: TransactionFunction = Arc::new(move |u| {
        let s = s.clone();
        Box::pin(async move { user::leave(u, &s).await })
    });
    Ok(scenario!(name)
        .set_weight(weight)?
        .register_transaction(Transaction::new(join).set_name(join_name).set_on_start())
        .register_transaction(Transaction::new(tick).set_name("tick"))
        .register_transaction(Transaction::new(leave).set_name("leave").set_on_stop()))
}
