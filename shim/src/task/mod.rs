//! The Task API: [`service`] (the ttrpc adapter containerd calls), [`state`] (containers and
//! processes, the state machine), [`events`] (what containerd hears), [`guest`] (what the state
//! machine needs of the sandbox and its guest agent), [`answers`] (the checks of what the guest
//! answers), [`error`] (the one mapping to ttrpc
//! codes), [`timings`] (the record of each start's stages).

pub mod answers;
pub mod error;
pub mod events;
pub mod guest;
pub mod service;
pub mod state;
pub mod timings;

#[cfg(test)]
mod tests;

pub use service::KiteTask;
