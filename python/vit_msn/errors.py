"""The exceptions this package raises, one per kind of failure, each with a
message that names the file or field at fault (the Rust runtime's wording
where it has one)."""


class VitMsnError(Exception):
    """Base class: every refusal of this package is one of these."""


class ManifestError(VitMsnError):
    """A manifest.json (or a preprocessing config) that is missing, not JSON,
    or that fails one of the runtime's checks."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class DigestError(VitMsnError):
    """An artifact whose sha256 differs from the manifest's: the file was
    modified after the bundle was written."""

    def __init__(self, path, expected, found):
        self.path, self.expected, self.found = str(path), expected, found
        super().__init__(
            f"{path}: sha256 is {found}, the manifest says {expected}; "
            "refusing to load a modified artifact"
        )


class ArtifactError(VitMsnError):
    """An artifact that cannot be loaded, disagrees with its own description,
    or returns outputs the manifest does not list."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: cannot load TorchScript: {message}")


class DeviceError(VitMsnError):
    """A bundle asked to run where it cannot (a CUDA bundle without a GPU,
    oneDNN kernels this CPU lacks)."""

    def __init__(self, message):
        super().__init__(f"device: {message}")


class InputError(VitMsnError, ValueError):
    """A forward input of the wrong shape, dtype or value."""

    def __init__(self, name, message):
        self.name = name
        super().__init__(f"input `{name}`: {message}")


class ImageError(VitMsnError, ValueError):
    """An image that cannot be read or decoded."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class ForwardError(VitMsnError):
    """The artifact's forward pass failed or returned the wrong outputs."""

    def __init__(self, message):
        super().__init__(f"forward failed: {message}")
