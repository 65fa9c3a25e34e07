"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """A problem with the user's input (config key, file, line, alias) that the user can fix."""


class ConfigError(UserError):
    """One or more config problems, collected so the user sees all of them at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
