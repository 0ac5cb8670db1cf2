"""Input checks shared by the loss modules: fail early with a message that names the argument."""

def check_non_negative(name: str, value: float) -> None:
    """Raise if a loss weight is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
