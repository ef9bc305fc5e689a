"""bench/stacks.py: py-spy's collapsed stacks summed into inclusive and self shares per function."""
from bench.stacks import summarise

RAW = [
    'process 1:"gunicorn";serve (ws/gateway.py:300);handle_frame (ws/gateway.py:350);send (gevent/_socketcommon.py:10) 6\n',
    'process 1:"gunicorn";serve (ws/gateway.py:300);handle_frame (ws/gateway.py:351);mark_received (app/chat/receipts.py:80) 3\n',
    'process 1:"gunicorn";hub (gevent/hub.py:1) 1\n',
    'a line py-spy never writes\n',
]


def test_functions_sum_over_their_lines_and_each_stack_counts_once_per_function():
    total, inclusive, own = summarise(RAW)
    assert total == 10
    assert inclusive["handle_frame (ws/gateway.py)"] == 9  # two lines of one function are one function
    assert inclusive["serve (ws/gateway.py)"] == 9 and own["send (gevent/_socketcommon.py)"] == 6
    assert own["hub (gevent/hub.py)"] == 1 and "serve (ws/gateway.py)" not in own


def test_match_keeps_only_the_stacks_through_a_frame():
    total, inclusive, own = summarise(RAW, match="mark_received")
    assert total == 3 and own == {"mark_received (app/chat/receipts.py)": 3}
