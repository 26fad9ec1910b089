//! The one error type of the authorization module.

/// Why a policy could not be turned into something weft can enforce.
///
/// Exists so that a single bad policy can be rejected with a message that
/// names it (`namespace/name`) and the offending field, while the loader
/// keeps every other policy in force. Every variant carries enough context
/// to be logged on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// The YAML text of one document could not be parsed at all.
    #[error("document {index} (line {line}): invalid YAML: {message}")]
    Yaml {
        /// One-based position of the document among the stream's non-empty ones.
        index: usize,
        /// One-based line in the whole stream.
        line: usize,
        message: String,
    },

    /// A document in a stream was rejected; wraps the reason with its position.
    #[error("document {index} (line {line}): {source}")]
    InDocument {
        /// As in [`AuthzError::Yaml`].
        index: usize,
        /// The line the document's content starts on.
        line: usize,
        source: Box<AuthzError>,
    },

    /// The object is some other Kubernetes kind.
    #[error("not an AuthorizationPolicy: apiVersion {api_version:?}, kind {kind:?} (expected security.istio.io/v1 or v1beta1, AuthorizationPolicy)")]
    WrongKind { api_version: String, kind: String },

    /// A field the policy cannot do without is missing or empty.
    #[error("authorization policy {policy}: missing required field {field}")]
    Missing { policy: String, field: String },

    /// A field has a value of the wrong shape or an unparsable value.
    #[error("authorization policy {policy}: {field}: invalid value {value}: {reason}")]
    InvalidValue {
        policy: String,
        field: String,
        value: String,
        reason: String,
    },

    /// The action is AUDIT, CUSTOM or unknown; weft enforces ALLOW and DENY only.
    #[error("authorization policy {policy}: unsupported action {action:?} (weft enforces ALLOW and DENY only)")]
    UnsupportedAction { policy: String, action: String },

    /// A feature weft deliberately does not implement (the policy would not be
    /// enforced the way its author expects, so it is refused rather than guessed at).
    #[error("authorization policy {policy}: {field} is not supported: {reason}")]
    Unsupported {
        policy: String,
        field: String,
        reason: String,
    },
}

impl AuthzError {
    /// Attaches the position of the document this error came from.
    pub(crate) fn in_document(self, index: usize, line: usize) -> Self {
        match self {
            // Already positioned: don't nest the position twice.
            e @ (AuthzError::Yaml { .. } | AuthzError::InDocument { .. }) => e,
            e => AuthzError::InDocument {
                index,
                line,
                source: Box::new(e),
            },
        }
    }
}
