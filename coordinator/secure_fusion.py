"""`SecureFusion`: the fused reward by secure aggregation; the coordinator learns only the sum over silos.

The same rounds as `ClearFusion` (each silo is sent only its own weights;
absent silos' weight goes to the others; orphan rows get the plain average,
here within the restarted round itself, since asking them again, as
`ClearFusion` does, would decrypt two sums of one row over the same silos),
with each round's sum formed under encryption (DESIGN §4,
silo_agent/secure_rounds.py):

1. the silos' signed key-agreement keys and certificates are fetched once
   and relayed with every request (each silo verifies them itself);
2. every participant gets `SecureScore` with its own weights and the round's
   participant list, and answers a masked BFV ciphertext of its terms;
3. a silo that does not answer makes the round restart with the others under
   a new round id (its masks would not cancel), below the minimum the round
   fails;
4. the coordinator adds the ciphertexts with its public context, adds a
   one-time blinding from OS entropy, has the round's decryptor (the
   participants in turn) decrypt it, and subtracts the blinding.

A round holds at most `ROWS_PER_REQUEST` rows (one ciphertext); more rows
are several rounds, restarted together if a silo drops out in any of them.
Nothing is decrypted until every one of those rounds has been answered by the
same participants: a chunk decrypted over {A, B, C} and again, after C
dropped out of a later chunk, over {A, B} would hand the coordinator the
difference of the two sums, C's own terms. Across calls, fusions and
processes, `DecryptedRows` keeps the same promise: a row fused again under
the same weights is answered from the record, and no sum is decrypted that
would, with the row's earlier sums, determine a silo's score on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts
import torch

from mor_secure.secagg import aggregation
from mor_secure.secagg.fixed_point import MAX_PARTICIPANTS
from mor_secure.transport.authorization import AuditSink
from mor_secure.wire.client import SecureSiloClient
from mor_secure.wire.errors import ErrorCode, SiloError
from mor_secure.wire.messages import DecryptRequest, Participant, SecureScoreRequest

from .audit_trail import new_round_id
from .decrypted_rows import DecryptedRows
from .fusion import (ABSENT, ClearFusion, FusionItems, RoundFailedError, equal_weights_for_orphans, raise_refusal,
                     renormalised, weighted, without_orphans)
from .silo_requests import ROWS_PER_REQUEST, score_requests


class SecureFusion(ClearFusion):
    """`ClearFusion`'s rounds, with each round's sum computed under masks and encryption."""

    def __init__(self, clients: Sequence[SecureSiloClient], context: ts.Context, *, objective: str = "correct",
                 minimum_participants: int | None = None, audit: AuditSink | None = None, method: str = "",
                 decrypted: DecryptedRows | None = None) -> None:
        super().__init__(clients, objective=objective, minimum_participants=minimum_participants, audit=audit,
                         method=method)
        for index, client in enumerate(self.clients):
            if not isinstance(client, SecureSiloClient):
                raise ValueError(f"clients[{index}] ({client.name}) cannot take part in secure aggregation "
                                 "(agreement_key, secure_score, decrypt)")
        if len(self.clients) > MAX_PARTICIPANTS:
            raise ValueError(f"secure aggregation sums at most {MAX_PARTICIPANTS} silos' terms without overflowing "
                             f"its fixed-point range; this consortium has {len(self.clients)}")
        if not context.is_public():
            raise ValueError("the coordinator's context must be the public one (it must never be able to decrypt)")
        self.context = context
        # The pool's record, shared by all its fusions (coordinator.pool); alone, this fusion's own.
        self.decrypted = decrypted if decrypted is not None else DecryptedRows(self.silo_names)
        self._participants: dict[str, Participant] = {}
        self._rounds = 0

    def _participant(self, client: SecureSiloClient) -> Participant:
        if client.name not in self._participants:
            reply = client.agreement_key()
            self._participants[client.name] = Participant(name=client.name, agreement_key=reply.agreement_key,
                                                          certificate_pem=reply.certificate_pem)
        return self._participants[client.name]

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        """`ClearFusion.fuse` over the rows not fused before under the same weights (`SAME_WEIGHTS`); the others
        from the record."""
        if tuple(weights.shape) != (len(items), len(self.clients)):
            return super().fuse(items, weights)  # its shape error
        rows = self.decrypted.row_keys(self.objective, items.images, items.prompts, items.responses)
        known = self.decrypted.known(rows, self._by_silo(weights))
        new = [i for i, value in enumerate(known) if value is None]
        fused = torch.tensor([0.0 if value is None else value for value in known])
        if not new:
            self.last_round = {}  # no silo was asked
            return fused
        fused[new] = super().fuse(FusionItems(
            images=tuple(items.images[i] for i in new), prompts=tuple(items.prompts[i] for i in new),
            responses=tuple(items.responses[i] for i in new),
            kinds=None if items.kinds is None else tuple(items.kinds[i] for i in new)), weights[new])
        return fused

    def _by_silo(self, weights: torch.Tensor) -> list[dict[str, float]]:
        return [dict(zip(self.silo_names, row, strict=True)) for row in weights.detach().double().cpu().tolist()]

    def _round(self, clients: Sequence[SecureSiloClient], rows: tuple[list, list, list], weights: torch.Tensor,
               kinds: Sequence[str] | None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        asked = list(clients)
        position = {c.name: k for k, c in enumerate(self.clients)}
        while True:
            # A row with (almost) none of its weight on the silos asked is sent their equal weights in this round,
            # not asked again in a second one: two sums of one row over the same silos under two known weightings
            # are two equations in their scores (two silos: both solved, to 1e-3 in a probe). Its router weights
            # are left out of the round's mean weights on record (the kind None).
            present = torch.zeros(len(self.clients), dtype=torch.bool)
            present[[position[c.name] for c in asked]] = True
            sent, orphans = equal_weights_for_orphans(weights, present)
            labels = without_orphans(kinds, orphans)
            # Before any silo is asked: no sum is decrypted that would, with the sums of its rows decrypted
            # before, determine a silo's score, and a weighting refused here costs the silos nothing and is no
            # round on record (refused after the asks, its rounds were logged with the router's weights as if
            # their rows had got a reward).
            keys = self.decrypted.row_keys(self.objective, *rows)
            vectors = [{c.name: row[position[c.name]] for c in asked} for row in sent.double().tolist()]
            self.decrypted.refuse_revealing(keys, vectors)
            failures: dict[str, SiloError] = {}
            answered, on_record, rewarded = [], [], False
            try:
                for start in range(0, len(rows[0]), ROWS_PER_REQUEST):
                    part = tuple(column[start:start + ROWS_PER_REQUEST] for column in rows)
                    answered.append(self._secure_round(
                        asked, part, sent[start:start + ROWS_PER_REQUEST],
                        None if labels is None else labels[start:start + ROWS_PER_REQUEST], failures, on_record))
                    if failures:
                        break  # the remaining chunks would be asked again anyway, of the present silos
                if not failures:
                    # Every chunk was answered by all of `asked`: only now is any sum decrypted, each over that
                    # one set. Checked again: another coordinator process sharing the record file may have
                    # decrypted these rows meanwhile.
                    self.decrypted.refuse_revealing(keys, vectors)
                    summed = torch.cat([self._decrypted_sum(asked, *chunk) for chunk in answered])
                    fused, _ = renormalised(summed, sent, present)
                    self.decrypted.add(keys, self._by_silo(weights), vectors, fused.tolist())
                    rewarded = True
            finally:
                # The attempt's rounds go on record when it ends, each with the router's weights only if its sums
                # were decrypted into the rows' reward: an abandoned attempt's rows are in the restart too (the
                # report's mean router weight would count them twice), and a decryption that failed formed none.
                for *entry, kinds_of_round in on_record:
                    self._on_record(*entry, kinds_of_round if rewarded else None)
            if rewarded:
                return [c.name for c in asked], summed, sent
            present = [c for c in asked if c.name not in failures]
            self._check_minimum({**{c.name: None for c in asked}, **failures}, [c.name for c in present])
            asked = present  # a restart under new round ids: the absent silo's masks would not cancel

    def _secure_round(self, clients: Sequence[SecureSiloClient], rows: tuple[list, list, list],
                      weights: torch.Tensor, kinds: Sequence[str] | None, failures: dict[str, SiloError],
                      on_record: list[tuple]) -> tuple[str, int, list[ts.BFVVector]]:
        """One round of at most one ciphertext, asked but not decrypted: (round id, rows, the silos' vectors).

        Fills `failures` (absent silos) instead of raising for them; the round is then worthless. Appends what
        its entry records (`_on_record`'s arguments) to `on_record`, a refused round's too; `_round` writes them.
        """
        keys = self._in_parallel(clients, self._participant)  # a silo's key is fetched once, when first asked
        raise_refusal(keys)
        failures.update({name: key for name, key in keys.items() if isinstance(key, SiloError)})
        if failures:
            return "", 0, []
        round_id = new_round_id()
        (shared,) = score_requests(*rows, objective=self.objective, round_id=round_id)
        column = {c.name: k for k, c in enumerate(self.clients)}
        participants = tuple(keys[c.name] for c in clients)
        requests = {c.name: SecureScoreRequest(score=weighted([shared], weights[:, column[c.name]])[0],
                                               participants=participants) for c in clients}
        answers = self._in_parallel(clients, lambda c: self._contribution(c, requests[c.name], len(shared.rows)))
        present = [name for name, answer in answers.items() if not isinstance(answer, Exception)]
        on_record.append((round_id, [c.name for c in clients], present,
                          {name: [request] for name, request in requests.items()}, weights, kinds))
        raise_refusal(answers)
        failures.update({name: a for name, a in answers.items() if isinstance(a, SiloError)})
        return round_id, len(shared.rows), [a for a in answers.values() if not isinstance(a, SiloError)]

    def _contribution(self, client: SecureSiloClient, request: SecureScoreRequest, items: int) -> ts.BFVVector:
        """A silo's answer to `SecureScore`: one ciphertext of `items` terms, or INTERNAL (its fault)."""
        ciphertext = _one(client.secure_score(request).ciphertexts, "ciphertext", client.name)
        try:
            return aggregation.vector(ciphertext, self.context, items=items)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise SiloError(ErrorCode.INTERNAL, f"silo {client.name!r} answered a ciphertext that is not the "
                            f"round's: {exc}") from None

    def _decrypted_sum(self, clients: Sequence[SecureSiloClient], round_id: str, count: int,
                       contributions: list[ts.BFVVector]) -> torch.Tensor:
        """The round's sum over `clients`: added under encryption, blinded, decrypted by one of them, unblinded."""
        blinding = aggregation.new_blinding(count)
        blinded = aggregation.blind(aggregation.add(contributions), blinding)
        decrypted = self._decrypt(clients, round_id, blinded, count)
        return torch.tensor(aggregation.unblind(decrypted, blinding, count), dtype=torch.float32)

    def _decrypt(self, clients: Sequence[SecureSiloClient], round_id: str, blinded: bytes, count: int) -> np.ndarray:
        """The round's decryptor decrypts its `count` values: the participants in turn, the next one if it is
        unreachable."""
        names = tuple(c.name for c in clients)
        start, self._rounds = self._rounds % len(clients), self._rounds + 1
        errors = []
        for offset in range(len(clients)):
            decryptor = clients[(start + offset) % len(clients)]
            try:
                reply = decryptor.decrypt(DecryptRequest(round_id=round_id, participants=names,
                                                         ciphertexts=(blinded,)))
                values = _one(reply.values, "decrypted vector", decryptor.name)
            except SiloError as error:
                if error.code not in ABSENT:
                    raise
                errors.append(str(error))
                continue
            if len(values) != count:
                raise SiloError(ErrorCode.INTERNAL, f"silo {decryptor.name!r} decrypted {len(values)} values of round "
                                f"{round_id}, which has {count} items")
            return np.asarray(values, dtype=np.int64)
        raise RoundFailedError(f"no participant of round {round_id} could decrypt it: {'; '.join(errors)}")


def _one(answers: Sequence, what: str, silo: str):
    """The one `what` a silo's answer must hold; INTERNAL (its fault, the round fails on record) otherwise."""
    if len(answers) != 1:
        raise SiloError(ErrorCode.INTERNAL, f"silo {silo!r} answered {len(answers)} {what}s, not one")
    return answers[0]
