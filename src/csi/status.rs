//! Maps module errors to gRPC status codes at the edge.

use tonic::Status;

use crate::{class, provider, volume};

impl From<volume::Error> for Status {
    fn from(err: volume::Error) -> Status {
        use volume::Error as V;
        let message = err.to_string();
        match err {
            V::AlreadyExists(_) => Status::already_exists(message),
            V::Class(class::Error::NotFound { .. }) => Status::not_found(message),
            V::Class(class::Error::Invalid(_)) => Status::failed_precondition(message),
            V::Class(class::Error::Unavailable(_)) => Status::unavailable(message),
            V::Provider(p) => match p {
                provider::Error::SocketMissing { .. } | provider::Error::Unreachable { .. } => {
                    Status::unavailable(message)
                }
                provider::Error::Timeout { .. } => Status::deadline_exceeded(message),
                provider::Error::InvalidName(_)
                | provider::Error::InvalidResponse { .. }
                | provider::Error::TooLarge { .. } => Status::failed_precondition(message),
                provider::Error::Memory(crate::secret_mem::Error::SecretMemRequired) => {
                    Status::failed_precondition(message)
                }
                provider::Error::Call { .. }
                | provider::Error::Provider { .. }
                | provider::Error::Memory(_) => Status::internal(message),
            },
            V::Target { .. } | V::ProviderWroteFiles { .. } => Status::failed_precondition(message),
            V::Mount(_) | V::Internal(_) => Status::internal(message),
            V::HandedOver => Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes() {
        let cases: Vec<(volume::Error, Code)> = vec![
            (
                volume::Error::AlreadyExists("x".into()),
                Code::AlreadyExists,
            ),
            (
                class::Error::NotFound {
                    namespace: "n".into(),
                    name: "c".into(),
                    hint: String::new(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                provider::Error::SocketMissing {
                    provider: "p".into(),
                    dirs: "/d".into(),
                }
                .into(),
                Code::Unavailable,
            ),
            (
                provider::Error::InvalidResponse {
                    provider: "p".into(),
                    reason: "r".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                provider::Error::Provider {
                    provider: "p".into(),
                    code: "E".into(),
                }
                .into(),
                Code::Internal,
            ),
            (
                provider::Error::Timeout {
                    provider: "p".into(),
                    secs: 1,
                }
                .into(),
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }
}
