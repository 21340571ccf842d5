"""The declaration of one player of an alternating game."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_lossmix._errors import LossMixError, check_name
from lightning_lossmix._safe_globals import allow_loading

_RESERVED = ("loss", "weight", "skipped_steps")


@dataclass(frozen=True)
class Player:
    """One player of a game: the terms it minimizes (or maximizes) with its own optimizer.

    A `LossMixModule` declared with players updates them in turn on each batch, in the order
    given, with the optimizers that `configure_optimizers` returns in the same order.

    Args:
        name: the player's name, used in the logs (``train/<name>/loss``).
        terms: the names of the `LossTerm`s this player optimizes; each term belongs to one
            player.

    Examples:
        >>> Player("discriminator", terms=["real", "fake"])
        Player(name='discriminator', terms=('real', 'fake'))
    """

    name: str
    terms: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name(self.name, "Player")
        if self.name in _RESERVED:
            raise LossMixError(
                f"Player {self.name!r}: the name is taken by the logs (train/{self.name}/...); "
                f"choose another, such as 'generator'. Reserved: {list(_RESERVED)}."
            )
        given = self.terms
        terms = (given,) if isinstance(given, str) else tuple(given or ())
        if not all(isinstance(term, str) for term in terms):
            raise LossMixError(
                f"Player {self.name!r}: `terms` should be the names of LossTerms. "
                f"Found `terms = {given!r}`."
            )
        if not terms:
            raise LossMixError(
                f"Player {self.name!r} has no terms: give it the names of the LossTerms it "
                "optimizes, e.g. Player('generator', terms=['adversarial'])."
            )
        object.__setattr__(self, "terms", terms)


allow_loading(Player)  # it travels in checkpoints' hyperparameters
