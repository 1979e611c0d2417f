/// shmbroker's release version: the one place it is written. The daemon and an embedded owner
/// report it (HELLO_OK, STATUS); `libshmbroker`'s Makefile and `systemd/build-deb.sh` read it
/// from this file, and a test checks that the Python package's `pyproject.toml` and
/// `__version__` say the same.
public enum ShmBrokerVersion {
    /// The version, `MAJOR.MINOR.PATCH`.
    public static let string = "0.2.0"
}
