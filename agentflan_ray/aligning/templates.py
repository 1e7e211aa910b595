"""Template banks for template-mode rendering. Each rendering picks one phrasing with a seeded
random choice, so samples vary but reruns are identical. None of the chat-aligned phrasings gives a
format instruction: they read as ordinary conversation."""

from __future__ import annotations

ALIGNED_SYSTEM = "Answer the following questions as best you can. You have access to the following APIs.\n"

# Thoughts for ToolBench steps whose source thought is empty.
FALLBACK_THOUGHTS = (
    "To make progress on this request, I should look into it with {tool}.",
    "The next useful thing is to query {tool} for the information I still need.",
    "I don't have that information yet, so I'll check it with {tool}.",
    "Let me gather the relevant data using {tool} before answering.",
    "I need more details to answer properly, and {tool} should provide them.",
)

# Connective sentences of tflan_cot turns: they name the tool before the call block.
COT_CONNECTIVES = (
    "I will operate {name}. To represent this tool and its parameters using a Python dictionary, it would look like this:",
    "At this step, I am going to execute {name}. Here is the call as a Python dictionary:",
    "So I'll call {name} now, with these parameters:",
    "The right tool for this is {name}; this is the call I'm making:",
    "Next, I'm using {name}. Written out as a dictionary, the call is:",
    "I'll go ahead with {name}, called like this:",
)

# User turns of tflan_decomposed that elicit the tool name (retrieval) and the arguments (understanding).
ELICIT_TOOL = (
    "Which tool will you use for this?",
    "What tool do you need for that step?",
    "Okay. Which API should be called?",
    "Go ahead. Which function are you going to use?",
    "Sounds reasonable. What tool will you pick?",
    "Which of the available APIs fits this step?",
)
ELICIT_ARGUMENTS = (
    "What arguments will you pass to it?",
    "And what parameters should the call have?",
    "Please give the input for that call.",
    "What values do you want to send?",
    "Fine. What are the parameters?",
    "Which arguments does the call need?",
)
RETRIEVAL_ANSWERS = (
    "{name}",
    "I will use {name}.",
    "The tool for this step is {name}.",
    "I'll call {name}.",
    "{name} is the one I need.",
)
ARGUMENT_LEADS = (
    "The arguments are:",
    "I'll pass these parameters:",
    "Here is the input:",
    "",
)

# ReAct-style protocols of the `react` stream: text keys or JSON keys, varied per sample.
REACT_TEXT_KEYS = (
    ("Thought", "Action", "Action Input"),
    ("THOUGHT", "ACTION", "ACTION INPUT"),
    ("Thought", "Tool", "Tool Input"),
)
REACT_JSON_KEYS = (
    ("thought", "action", "args"),
    ("InnerThought", "Action", "Parameters"),
    ("cot", "command", "ActionInput"),
    ("thought", "name", "arguments"),
)

# Format-following protocols of the `instruct` stream (JSON with varied keys, or goal:/name:/args: text).
INSTRUCT_JSON_KEYS = (
    ("goal", "Tool", "Param"),
    ("thought", "name", "args"),
    ("plan", "api_name", "parameters"),
    ("reason", "action", "action_input"),
)
INSTRUCT_TEXT_KEYS = (
    ("goal", "name", "args"),
    ("Goal", "Name", "Args"),
    ("thought", "api", "params"),
)

# AgentInstruct, chat-aligned: what each environment offers, stated without any output format.
ENV_SYSTEM = {
    "os": "You are working in a Linux (Ubuntu) shell on the user's behalf. You can run bash code and "
    "see its output, and when you know the answer to the user's question you tell them.",
    "db": "You help the user answer questions with a MySQL database. You can run one SQL statement at a "
    "time and see the raw result, and you tell the user the answer when you have it.",
    "alfworld": "You are an agent acting in a household. Each turn you can take one of the available "
    "actions and you will be told what happens.",
    "webshop": "You are shopping on a web store for the user. You can search for products and click on "
    "the buttons and links that the page offers.",
    "kg": "You answer questions with a knowledge base. You can query it with these functions: "
    "get_relations(entity or variable) lists the relations of an entity; get_neighbors(variable, relation) "
    "follows a relation; intersection(variable1, variable2) keeps entities in both; get_attributes(variable) "
    "lists numerical attributes; argmax(variable, attribute) and argmin(variable, attribute) pick the extreme "
    "entity; count(variable) counts entities. Each query result is stored as a variable #0, #1, and so on.",
    "mind2web": "You help the user operate a web page: you look at the page, choose the element to act on "
    "and say what to do with it.",
}
ENV_CONNECTIVES = {
    "bash": ("I'll run this in the shell:", "Let me execute:", "Here is the command I'm running:"),
    "sql": ("I'll run this query:", "Let me execute this SQL:", "The statement to run is:"),
    "action": ("So my next action is:", "I'll do this:", "Next step:", "The action I take is:"),
}
ENV_ANSWERS = ("The answer is {answer}.", "So the final answer is {answer}.", "My answer: {answer}.")
ENV_FINISH = ("The task is complete.", "That finishes the task.", "I'm done with this task.")
