"""A reward for the distributed tests (imported by path, ``distributed_rewards:by_answer``)."""


def by_answer(responses, answers):
    """Questions with an odd answer score 0 (HPT routes them to SFT); the others score by the
    parity of the response's length (mostly RL): both routes in one step, whatever the model."""
    return [
        float(int(a) % 2 == 0 and len(r) % 2 == 0) if a.strip().lstrip("-").isdigit() else 0.0
        for r, a in zip(responses, answers)
    ]
