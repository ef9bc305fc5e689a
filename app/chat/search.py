"""Message search: an application-written index that finds CJK words in unsegmented text.

MariaDB 10.11 has no ngram parser and a plain InnoDB FULLTEXT index treats
我们明天去北京开会 as one word, so the application segments text itself:
runs of CJK characters become overlapping bigrams (a lone CJK character stays
itself), other scripts become case-folded words. Each term is stored as a
short hash token (`t` + 16 hex digits) in `message_search.terms`: always
longer than InnoDB's minimum token size, never a stopword, never an operator,
and no second plain copy of the message text. The row also holds scope tokens
(the private chat's two parties, or the group), and a query requires one of
the asker's scopes, so the index returns the asker's candidates only: a word
that is in a fifth of a million messages costs no more than the asker's own. MySQL/MariaDB query it through
a FULLTEXT index, SQLite through an FTS5 table kept in step by triggers
(migration 0008).

Bigrams and hashes over-approximate (北京 and 京开 may sit apart, two terms may
share a hash), so every candidate is checked against its content before it is
returned: each query word must be a word of the message and each CJK run of the
query must occur in it. Rows are written by persist in the message's own
transaction and deleted when a message is recalled, so recalled content is
never found.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session

from app.chat.conversations import visible_messages
from app.errors import InvalidInput
from app.storage import Storage
from models import STATUS_RECALLED, GroupMember, Message, MessageSearch

QUERY_MIN_CHARS, QUERY_MAX_CHARS = 2, 200
SEARCH_DEFAULT_LIMIT, SEARCH_MAX_LIMIT = 20, 100
CANDIDATE_BATCH = 200  # candidates fetched per round while the content check drops some
SCAN_FIRST = 500  # newest visible messages checked directly before the index is asked

# Han (with extensions and compatibility ideographs), kana, Hangul, CJK symbols' letters.
_CJK = (r"\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
        r"\U00020000-\U0002ebef\U00030000-\U0003134f")
_SEGMENT_RE = re.compile(rf"([{_CJK}]+)|((?:(?![{_CJK}])\w)+)")


def normalize(content: str) -> str:
    """The form both the index and the content check compare: NFKC, case-folded
    (full-width Ｂｅｉｊｉｎｇ matches beijing)."""
    return unicodedata.normalize("NFKC", content).casefold()


@dataclass(frozen=True)
class Terms:
    """What a text is made of for search: its words (other scripts) and its CJK runs."""

    words: frozenset[str]
    cjk_runs: tuple[str, ...]

    @classmethod
    def of(cls, content: str) -> Terms:
        words, runs = set(), []
        for cjk, word in _SEGMENT_RE.findall(normalize(content)):
            if cjk:
                runs.append(cjk)
            else:
                words.add(word)
        return cls(frozenset(words), tuple(runs))

    def index_terms(self) -> set[str]:
        terms = set(self.words)
        for run in self.cjk_runs:
            terms.update(run if len(run) == 1 else (run[i:i + 2] for i in range(len(run) - 1)))
        return terms

    def found_in(self, content: str) -> bool:
        """Whether a message's text really holds every word and every CJK run of this query."""
        if not self.words <= Terms.of(content).words:
            return False
        text_ = normalize(content)
        return all(run in text_ for run in self.cjk_runs)


def _token(term: str) -> str:
    return "t" + hashlib.blake2b(term.encode("utf-8"), digest_size=8).hexdigest()


@dataclass(frozen=True)
class IndexedMessage:
    """What the index needs of a message: its text, and who it belongs to."""

    msg_id: int
    content: str
    sender_id: int
    receiver_id: int | None  # None for a group message
    group_id: int | None


def _scope_tokens(sender_id: int, receiver_id: int | None, group_id: int | None) -> list[str]:
    # Who a message belongs to, as index terms (a NUL cannot occur in a word): a query ANDs
    # the asker's scopes with its words, so the index itself returns only the asker's
    # candidates instead of every message in the corpus that holds a common word.
    if group_id is not None:
        return [_token(f"\0g{group_id}")]
    return [_token(f"\0p{sender_id}"), _token(f"\0p{receiver_id}")]


def index_row(message: IndexedMessage) -> dict | None:
    """The message_search row of a message, or None when its text holds nothing searchable."""
    terms = Terms.of(message.content).index_terms()
    if not terms:
        return None
    tokens = {_token(t) for t in terms} | set(_scope_tokens(message.sender_id, message.receiver_id,
                                                             message.group_id))
    return {"message_id": message.msg_id, "terms": " ".join(sorted(tokens))}


def index_messages(session: Session, messages: list[IndexedMessage]) -> None:
    """Add messages to the index, inside the caller's (persist's) transaction."""
    rows = [row for row in map(index_row, messages) if row is not None]
    if rows:
        session.execute(insert(MessageSearch), rows)


def unindex_message(session: Session, msg_id: int) -> None:
    """A recalled (or removed) message leaves the index with its content."""
    session.execute(delete(MessageSearch).where(MessageSearch.message_id == msg_id))


def parse_query(q) -> Terms:
    """The user's query as terms; InvalidInput for one that is missing, too short or too long.
    One of punctuation and spaces alone has no terms and finds nothing."""
    if not isinstance(q, str) or q == "":
        raise InvalidInput("query parameter 'q' is required")
    if len(q) < QUERY_MIN_CHARS:
        raise InvalidInput(f"'q' must be at least {QUERY_MIN_CHARS} characters")
    if len(q) > QUERY_MAX_CHARS:
        raise InvalidInput(f"'q' must be at most {QUERY_MAX_CHARS} characters")
    return Terms.of(q)


def _match(is_mysql: bool, tokens: list[str], scopes: list[str]):
    """Every term, and at least one of the asker's scopes. Tokens are `t` + hex digits:
    nothing of the user's query reaches the match syntax."""
    if is_mysql:
        return text("MATCH (message_search.terms) AGAINST (:match IN BOOLEAN MODE)").bindparams(
            match=" ".join(f"+{t}" for t in tokens) + " +(" + " ".join(scopes) + ")")
    return MessageSearch.message_id.in_(
        select(text("rowid")).select_from(text("message_search_fts"))
        .where(text("message_search_fts MATCH :match").bindparams(
            match=" AND ".join(tokens) + " AND (" + " OR ".join(scopes) + ")")))


def _scopes_of(session: Session, user_id: int, conversation_id: str | None) -> list[str]:
    """The scope tokens of what this user may see: their private chats, and every group they
    were ever a member of (the membership windows are applied in SQL)."""
    if conversation_id is not None and conversation_id.startswith("g_") and conversation_id[2:].isdigit():
        return [_token(f"\0g{int(conversation_id[2:])}")]
    scopes = [_token(f"\0p{user_id}")]
    if conversation_id is None:
        scopes += [_token(f"\0g{gid}") for gid in session.scalars(
            select(GroupMember.group_id).where(GroupMember.user_id == user_id))]
    return scopes


def _matching(session, query, terms: Terms, before: int | None, limit: int, batch: int,
              rounds: int | None = None) -> tuple[list[Message], int | None, bool]:
    """Candidates of `query` older than `before`, newest first, that really hold the terms: until
    more than `limit` are found, the candidates run out, or after `rounds` batches. Returns
    (matches, the id to continue below, whether the candidates ran out)."""
    found: list[Message] = []
    while len(found) <= limit and rounds != 0:
        page = query.where(Message.id < before) if before is not None else query
        rows = session.scalars(page.order_by(Message.id.desc()).limit(batch)).all()
        found += [m for m in rows if terms.found_in(m.content)]
        if len(rows) < batch:
            return found, before, True
        before, rounds = rows[-1].id, None if rounds is None else rounds - 1
    return found, before, False


def search_messages(storage: Storage, user_id: int, q, conversation_id: str | None, before: int | None,
                    limit: int, frame_of) -> dict:
    """Messages the user may see (as history shows them) that contain `q`, newest first,
    older than `before` (a msg_id); `next_before` pages on."""
    terms = parse_query(q)
    if not 1 <= limit <= SEARCH_MAX_LIMIT:
        raise InvalidInput(f"'limit' must be from 1 to {SEARCH_MAX_LIMIT}")
    tokens = sorted(_token(t) for t in terms.index_terms())
    if not tokens:
        return {"messages": [], "has_more": False, "next_before": None}
    with storage.read_session_for(user_id) as session:
        visible = visible_messages(session, user_id, conversation_id).where(Message.status != STATUS_RECALLED)
        # A common term has a huge posting list (slow to read in full) but fills a page from the
        # newest messages at once: try those first; a rarer one goes on through the index.
        found, cursor, exhausted = _matching(session, visible, terms, before, limit, SCAN_FIRST, rounds=1)
        if len(found) <= limit and not exhausted:
            indexed = visible.join(MessageSearch, MessageSearch.message_id == Message.id).where(
                _match(storage.is_mysql, tokens, _scopes_of(session, user_id, conversation_id)))
            found += _matching(session, indexed, terms, cursor, limit - len(found), CANDIDATE_BATCH)[0]
    has_more = len(found) > limit
    found = found[:limit]
    return {"messages": [frame_of(m) for m in found], "has_more": has_more,
            "next_before": str(found[-1].id) if has_more else None}


def reindex_messages(storage: Storage, progress=None, after: int = 0, batch: int = 1000) -> int:
    """Backfill: (re)write the index rows of every stored message with an id above `after`
    (messages stored before migration 0008, or an index to rebuild), a batch per transaction,
    in id order; recalled messages get none. Safe to run while persist writes and to run
    again. `progress(done, last_msg_id)` after each batch. Returns the messages indexed."""
    done = 0
    while True:
        with storage.session() as session:
            rows = session.execute(select(Message.id, Message.content, Message.status, Message.sender_id,
                                          Message.receiver_id, Message.group_id, Message.is_group)
                                   .where(Message.id > after).order_by(Message.id).limit(batch)).all()
            if not rows:
                return done
            ids = [row.id for row in rows]
            session.execute(delete(MessageSearch).where(MessageSearch.message_id.in_(ids)))
            index_messages(session, [IndexedMessage(row.id, row.content, row.sender_id, row.receiver_id,
                                                    row.group_id if row.is_group else None)
                                     for row in rows if row.status != STATUS_RECALLED])
        done, after = done + len(rows), ids[-1]
        if progress is not None:
            progress(done, after)
