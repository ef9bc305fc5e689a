"""Search latency over a large corpus: `python -m bench.search --messages 1000000`.

Provisions its own database, vhost and Redis db (real services when they
answer on 127.0.0.1, else embedded), bulk-inserts a corpus of private messages
(Chinese text without spaces and English text, words drawn Zipf-like from a
fixed vocabulary, so some terms are common and some rare) with their search
index rows as persist writes them (app.chat.search.index_row), printing
progress, then starts a real gateway and times `GET /api/search/messages` as
one user who is a party to about 1 % of the corpus: several query kinds, each
run many times. `--seed-seconds` stops seeding early (the summary says how
many messages were measured). Prints p50/p99 per kind and a JSON summary line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import requests
from sqlalchemy import insert

from bench import close_run, open_run
from tests.harness import Gateway, register_and_login

CHINESE = ("我们 明天 北京 开会 项目 计划 报告 客户 合同 会议 时间 地点 问题 方案 测试 上线 发布 版本 数据 服务器 "
           "数据库 网络 用户 手机 电脑 周末 吃饭 电影 天气 下雨 火车 飞机 酒店 上海 广州 深圳 杭州 成都 朋友 家人 "
           "学校 老师 学生 考试 作业 公司 老板 同事 工资 加班 休息 旅游 照片 视频 音乐 比赛 足球 篮球 咖啡 茶 "
           "早上 下午 晚上 今天 昨天 已经 可以 需要 应该 知道 觉得 喜欢 准备 开始 结束 完成 检查 确认 发送 收到 "
           "东京 会议室 预算 设计 文档 评审 部署 监控 告警 故障 恢复 备份 迁移 优化 性能 延迟 吞吐 索引 搜索").split()
ENGLISH = ("the meeting tomorrow project plan report client contract time place problem release version data server "
           "database network user phone laptop weekend dinner movie weather rain train flight hotel friend family "
           "school teacher student exam homework company boss colleague salary overtime holiday photo video music "
           "match football coffee tea morning afternoon evening today yesterday ready start finish check confirm "
           "send received budget design document review deploy monitor alert outage restore backup migrate "
           "optimize latency throughput index search invoice shipping warehouse deadline roadmap sprint").split()
BATCH = 5000
CONVERSATIONS = 10_000  # distinct private chats in the corpus
SEARCHER_SHARE = 0.01  # the measured user is a party to this share of the messages


def _zipf(words: list[str]) -> list[float]:
    return [1.0 / (rank + 1) for rank in range(len(words))]


def _content(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return "".join(rng.choices(CHINESE, weights=_zipf(CHINESE), k=rng.randint(4, 12)))
    return " ".join(rng.choices(ENGLISH, weights=_zipf(ENGLISH), k=rng.randint(5, 15)))


def seed_corpus(storage, searcher: int, count: int, seed_seconds: float) -> tuple[int, list[str]]:
    """Bulk-insert up to `count` messages with their index rows (stopping after seed_seconds);
    returns (messages stored, the searcher's conversation ids)."""
    from app.chat.conversations import private_conversation_id
    from app.chat.search import IndexedMessage, index_row
    from models import Conversation, Message, MessageSearch

    rng = random.Random(20261203)
    others = list(range(10**9, 10**9 + 2000))  # corpus users besides the searcher (no user rows needed)
    pairs = [tuple(rng.sample(others, 2)) for _ in range(CONVERSATIONS)]
    own = [(searcher, peer) for peer in rng.sample(others, 20)]
    with storage.session() as session:  # the searcher's conversation rows: a conversation_id filter needs them
        session.execute(insert(Conversation), [
            {"conversation_id": private_conversation_id(a, b), "user_id": a, "target_id": b, "is_group": False}
            for a, b in own])
    base_id, now = int(time.time() * 1000) << 22, int(time.time() * 1000)
    started, done = time.monotonic(), 0
    while done < count and time.monotonic() - started < seed_seconds:
        n = min(BATCH, count - done)
        messages, index = [], []
        for i in range(n):
            a, b = rng.choice(own) if rng.random() < SEARCHER_SHARE else rng.choice(pairs)
            if rng.random() < 0.5:
                a, b = b, a
            msg_id, content = base_id + done + i, _content(rng)
            messages.append({"id": msg_id, "conversation_id": private_conversation_id(a, b), "sender_id": a,
                             "receiver_id": b, "client_msg_id": f"bench-{done + i}", "message_type": "text",
                             "content": content, "extra": None, "is_group": False, "timestamp": now, "status": 0})
            row = index_row(IndexedMessage(msg_id, content, a, b, None))
            if row is not None:
                index.append(row)
        with storage.session() as session:
            session.execute(insert(Message), messages)
            session.execute(insert(MessageSearch), index)
        done += n
        if done % 50_000 < BATCH or done == count:
            rate = done / max(time.monotonic() - started, 1e-9)
            print(f"seeded {done}/{count} messages ({rate:.0f}/s)", flush=True)
    return done, [private_conversation_id(a, b) for a, b in own]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def time_queries(gateway, user, conversations: list[str], runs: int) -> dict[str, dict]:
    headers = {"Authorization": f"Bearer {user.token}"}
    kinds = {
        "common CJK word (北京)": {"q": "北京"},
        "rare CJK word (搜索)": {"q": "搜索"},
        "two CJK words (项目计划)": {"q": "项目计划"},
        "English word (meeting)": {"q": "meeting"},
        "two English words (deploy alert)": {"q": "deploy alert"},
        "no match (zzzz)": {"q": "zzzz"},
        "one conversation (北京)": {"q": "北京", "conversation_id": conversations[0]},
    }
    results = {}
    with requests.Session() as http:
        for name, params in kinds.items():
            times, hits = [], 0
            for _ in range(runs):
                start = time.perf_counter()
                r = http.get(f"{gateway.http}/api/search/messages", params={**params, "limit": 20}, headers=headers,
                             timeout=60)
                times.append((time.perf_counter() - start) * 1000)
                if r.status_code != 200:
                    raise SystemExit(f"{name}: {r.status_code} {r.text[:200]}")
                hits = len(r.json()["messages"])
            results[name] = {"p50_ms": round(_percentile(times, 50), 1), "p99_ms": round(_percentile(times, 99), 1),
                             "results": hits}
            print(f"{name}: p50 {results[name]['p50_ms']} ms, p99 {results[name]['p99_ms']} ms, "
                  f"{hits} results per page", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--seed-seconds", type=float, default=3600.0, help="stop seeding after this long")
    parser.add_argument("--runs", type=int, default=50, help="requests per query kind")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    kind, tmp, services = open_run(args.services, "search")
    gateway, ok = None, False
    try:
        import os

        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV")})
        from app.config import Settings
        from app.storage import Storage, upgrade_schema

        upgrade_schema(services.database_url)
        storage = Storage(Settings.from_env())
        gateway = Gateway("bench", services, tmp, DEDUPE_RECOVERY_SECONDS="0")
        searcher = register_and_login(gateway.http)
        print(f"seeding {args.messages} messages ({kind} services)...", flush=True)
        seed_start = time.monotonic()
        stored, conversations = seed_corpus(storage, int(searcher.user_id), args.messages, args.seed_seconds)
        seed_seconds = time.monotonic() - seed_start
        results = time_queries(gateway, searcher, conversations, args.runs)
        every = [v for r in results.values() for v in (r["p50_ms"], r["p99_ms"])]
        print(json.dumps({"bench": "search", "services": kind, "messages": stored, "requested": args.messages,
                          "seed_seconds": round(seed_seconds, 1), "runs_per_kind": args.runs,
                          "worst_p99_ms": max(every), "kinds": results}, ensure_ascii=False))
        ok = True
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
