//! Machine-readable reports of a finished (or interrupted) suite.

pub mod junit;
pub mod tap;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write report {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the JUnit report: {0}")]
    Junit(#[from] quick_junit::SerializeError),
}
