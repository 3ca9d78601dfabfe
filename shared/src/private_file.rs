//! Files that must be private to their owner (keys, bundles): read only
//! when no one else can read or write them.

use std::fs;
use std::path::Path;

/// Why [`read_private_text`] read nothing.
#[derive(Debug)]
pub enum PrivateRead {
    /// The file is readable or writable by its group or others: its mode.
    Exposed(u32),
    /// Opening or reading it failed.
    Io(std::io::Error),
}

/// Reads a text file that must be private to its owner. The mode is read
/// from the open file, so the file checked is the file read.
pub fn read_private_text(path: &Path) -> Result<String, PrivateRead> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut file = fs::File::open(path).map_err(PrivateRead::Io)?;
    let mode = file
        .metadata()
        .map_err(PrivateRead::Io)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(PrivateRead::Exposed(mode & 0o777));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(PrivateRead::Io)?;
    Ok(text)
}
