"""Errors a user can act on: stages print them as one line and exit non-zero."""


class PipelineError(Exception):
    """A failure with a message that names the file, URL or parameter and what to do."""


class DownloadError(PipelineError):
    """No source could deliver a verified file."""


class DataError(PipelineError):
    """Input data is malformed."""


class ParamsError(PipelineError):
    """params.yaml holds an invalid value."""


class WeightsError(PipelineError):
    """A checkpoint does not match the chosen model."""


class StorageError(PipelineError):
    """An output cannot be written: the disk is full, or its folder is read-only or not ours to write."""
