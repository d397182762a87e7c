"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class RankoneError(Exception):
    """A problem the user can fix: a missing file, a bad option, a mismatched tensor."""


class RankoneNote(UserWarning):
    """Something the user should know that is not an error (a trusted pickle loaded in full); the CLI prints one line."""
