//! The HTTP side of a node: the accept loop with its limits ([`server`]), the client port's
//! routes ([`routes`]: `/ws/{room}`, the page, the HTTP API), the moderation routes
//! ([`moderation`]), the rooms API ([`rooms`]), strict request decoding and the API key ([`request`]), plain responses
//! ([`response`]), the page and the JavaScript client ([`assets`]) and the admin port
//! ([`admin`]: `/metrics`, `/healthz`, `/readyz`).
//!
//! The top layer: it may import every other layer; none imports it.

pub mod admin;
pub mod assets;
pub mod moderation;
pub mod request;
pub mod response;
pub mod rooms;
pub mod routes;
pub mod server;
