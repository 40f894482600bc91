//! Opening files that hold secrets: mode 0600, never through a symbolic link,
//! and the errors that name the file (the state file and the subject database).

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use super::StoreError;

/// Mode 0600, and a symbolic link at the name is an error, never followed.
pub(super) fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    options
}

pub(super) fn open_error(path: &Path, e: io::Error) -> StoreError {
    #[cfg(unix)]
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return StoreError::Io(format!(
            "cannot open {}: it is a symbolic link, which is not followed",
            path.display()
        ));
    }
    io_error("cannot open", path, e)
}

pub(super) fn io_error(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::File {
        context: format!("{what} {}", path.display()),
        source: e,
    }
}
