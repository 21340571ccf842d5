"""The declaration of one player of an alternating game."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_lossmix._errors import LossMixError, check_int, check_name
from lightning_lossmix._safe_globals import allow_loading

_RESERVED = ("loss", "weight", "skipped_steps")


@dataclass(frozen=True, repr=False)
class Player:
    """One player of a game: the terms it minimizes (or maximizes) with its own optimizer.

    A `LossMixModule` declared with players updates them in turn on each batch, in the order
    given, with the optimizers that `configure_optimizers` returns in the same order.

    Args:
        name: the player's name, used in the logs (``train/<name>/loss``).
        terms: the names of the `LossTerm`s this player optimizes; each term belongs to one
            player.
        every_n_batches: the player steps on every `every_n_batches`-th batch only (1: every
            batch). WGAN's critic steps ``n_critic`` times per generator step: give the
            generator ``every_n_batches=n_critic``.

    Examples:
        >>> Player("discriminator", terms=["real", "fake"])
        Player(name='discriminator', terms=('real', 'fake'))
        >>> Player("generator", terms=["fool"], every_n_batches=5)
        Player(name='generator', terms=('fool',), every_n_batches=5)
    """

    name: str
    terms: tuple[str, ...]
    every_n_batches: int = 1

    def __repr__(self) -> str:
        every = f", every_n_batches={self.every_n_batches}" if self.every_n_batches != 1 else ""
        return f"Player(name={self.name!r}, terms={self.terms!r}{every})"

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
        check_int(self.every_n_batches, "every_n_batches", f"Player {self.name!r}", 1)


allow_loading(Player)  # it travels in checkpoints' hyperparameters
