"""Example agents: copy this file into your own app's agents.py and change the prompts.

- `assistant`: a streaming assistant over the OpenAI-compatible backend. Its reply streams
  to the client piece by piece (reply.delta) and ends with one reply.done.
- `summariser`: reacts to the assistant. Every `ok` reply.done of `assistant` on a stream
  whose name starts with `support:` starts one summariser run on that stream; its message
  is the assistant's reply, and its events' `cause` names the chain back to the client.
- `triage`: a chain of three steps, each its own Celery task: `route` (a hidden model call
  that names a topic; on failure the topic is "general" and the chain goes on), `answer`
  (visible: streams to the client, told the topic) and `check` (plain Python, visible only
  when it has something to add).

Which model each calls comes from SWITCHBOARD_OPENAI_MODEL (or a tenant's override in the
admin); the endpoint from SWITCHBOARD_OPENAI_BASE_URL (OpenAI, vLLM, Ollama, llama.cpp's
server, ...).
"""

from __future__ import annotations

from agents import Agent, On, PythonStep, Step, StepContext, agent, register

ASSISTANT_PROMPT = (
    "You are a helpful support assistant. Answer briefly and precisely.\n\nUser: {message}"
)
SUMMARY_PROMPT = "Summarise this support answer in one sentence:\n\n{input}"

register(
    Agent(
        name="assistant",
        description="Streams a helpful answer to the user's message.",
        steps=(
            Step(
                backend="openai",
                name="answer",
                prompt=ASSISTANT_PROMPT,
                soft_limit_s=20,
                max_retries=2,
                fallback_text="Sorry, the assistant is unavailable right now. Please try again.",
            ),
        ),
    )
)

register(
    Agent(
        name="summariser",
        description="Summarises each answer of the assistant on support streams.",
        steps=(
            Step(
                backend="openai",
                name="summary",
                prompt=SUMMARY_PROMPT,
                soft_limit_s=10,
                fallback_text="(no summary: the model did not answer)",
            ),
        ),
        subscribes=(On("reply.done", agent="assistant", streams="support:*"),),
    )
)

TOPICS = ("billing", "technical", "account", "general")


def route_prompt(context: StepContext) -> str:
    return (
        f"Classify the message into one of {', '.join(TOPICS)}. "
        f"Answer with the topic only.\n\nMessage: {context.message}"
    )


def check_answer(context: StepContext) -> str:
    """Adds a pointer to a human when the answer is about billing; otherwise nothing."""
    if context.outputs["route"].strip().lower().startswith("billing"):
        return "\n\nFor refunds and invoices you can also write to billing@example.com."
    return ""


@agent("triage", deadline_s=45)
def triage() -> list[Step | PythonStep]:
    """Routes a message to a topic, answers it with the topic in mind, then checks it."""
    return [
        Step(
            backend="openai",
            name="route",
            prompt=route_prompt,
            visible=False,
            soft_limit_s=5,
            max_retries=1,
            fallback_text="general",
            continue_on_fallback=True,
        ),
        Step(
            backend="openai",
            name="answer",
            prompt="Topic: {route}\nAnswer the user's message briefly.\n\nUser: {message}",
            soft_limit_s=20,
        ),
        PythonStep(check_answer, name="check", visible=True),
    ]
