//! Why a kernel reply could not be turned into the typed model.

/// Why a kernel reply could not be turned into the typed model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The reply lacks an attribute the model needs.
    #[error("the reply has no {0} attribute")]
    Missing(String),
    /// The reply carries a value the model cannot hold.
    #[error("{0}")]
    Invalid(String),
}
