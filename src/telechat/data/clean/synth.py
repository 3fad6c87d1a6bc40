"""Synthetic bilingual documents for the tests and the benchmark: clean Chinese and English prose
from slot templates (hundreds of thousands of distinct sentences, so unrelated documents are not
near-duplicates), edited copies (planted near-duplicates) and documents each rule must remove."""
from __future__ import annotations

import random

ZH = {
    "time": ["去年春天", "今年夏天", "上个月", "前几天", "昨天上午", "周末", "清晨", "傍晚时分", "国庆期间", "新年前夕",
             "三年前", "最近一段时间", "这学期", "那天下午", "入冬以后", "雨季到来之前", "开学第一周", "收获季节"],
    "place": ["北京", "上海的社区", "杭州西湖边", "成都的老街", "广州的工厂", "西安城墙下", "武汉的大学", "南京博物馆",
              "青岛海边", "昆明的花市", "哈尔滨冰雪大世界", "苏州园林", "重庆山城", "厦门鼓浪屿", "兰州的黄河岸边",
              "拉萨的广场", "天津港口", "长沙的书店"],
    "who": ["一位老教师", "几名大学生", "当地农民", "年轻的工程师", "社区志愿者", "一家小企业", "医生和护士", "研究团队",
            "退休的工人", "中学生们", "外地游客", "出租车司机", "图书管理员", "快递员", "厨师", "画家", "消防员", "科学家"],
    "did": ["完成了", "讨论了", "参观了", "整理了", "改进了", "记录了", "组织了", "研究了", "修复了", "分享了",
            "设计了", "介绍了", "观察了", "收集了", "翻译了", "测量了", "种下了", "拍摄了"],
    "what": ["一项新的实验", "古老的建筑", "城市交通方案", "地方志资料", "儿童读物", "节能设备", "传统手工艺", "野生鸟类",
             "河流水质数据", "乡村学校的课程", "一座旧桥", "社区花园", "历史照片", "天气观测记录", "公共图书目录",
             "农作物品种", "博物馆藏品", "方言词汇"],
    "how": ["大家都很满意", "效果比预想的好", "引起了许多人的关注", "还需要进一步改进", "得到了专家的肯定",
            "过程并不顺利", "花了很长时间", "参与者收获很大", "为后续工作打下基础", "媒体进行了报道",
            "孩子们特别喜欢", "数据已经公开", "计划明年继续", "费用比较低", "居民提出了建议", "当地政府给予支持"],
}
ZH_TEMPLATES = [
    "{time}，{who}在{place}{did}{what}，{how}。",
    "{who}{time}在{place}{did}{what}。{how}。",
    "在{place}，{who}{did}{what}，据说{how}。",
    "{time}{who}{did}{what}，地点是{place}，{how}。",
]
EN = {
    "time": ["Last spring", "Early in the morning", "During the summer", "A few weeks ago", "In the autumn of that year",
             "On a rainy Tuesday", "Before the holidays", "After the long winter", "Late one evening", "At the start of term",
             "Three years later", "In the following months", "Over the weekend", "Just before noon", "Once the fog lifted",
             "Soon after the election"],
    "who": ["a retired teacher", "the local council", "two young engineers", "a group of students", "the museum staff",
            "several farmers", "a small publishing house", "the volunteers", "an old fisherman", "the research team",
            "a young doctor", "the city librarians", "a family of bakers", "the night nurses", "a travelling musician"],
    "did": ["repaired", "studied", "described", "collected", "organised", "measured", "translated", "photographed",
            "rebuilt", "catalogued", "planted", "tested", "painted", "recorded", "explained"],
    "what": ["the old bridge over the river", "a collection of letters", "the water quality of the lake",
             "the village school garden", "a map of the coastline", "the records of the harbour", "a set of rare plants",
             "the history of the mill", "the bus routes of the town", "a series of winter storms", "the roof of the chapel",
             "the songs of the region", "the accounts of the market", "a row of apple trees", "the clock in the square"],
    "how": ["and most people agreed that the work was worth the effort",
            "although the weather made it harder than expected",
            "which took much longer than anyone had planned",
            "so that visitors could understand it more easily",
            "and the results were shared with the whole community",
            "while the children watched with great interest",
            "because nobody else had done it for many years",
            "and the newspaper wrote a short story about it",
            "even though the budget was very small",
            "with help from friends in the neighbouring town",
            "but the final report was never printed",
            "as the mayor had promised in her speech",
            "until the snow made the roads impassable",
            "and a second volume followed in the spring",
            "despite a loud argument at the first meeting",
            "though only a handful of people noticed"],
}
EN_TEMPLATES = [
    "{time}, {who} {did} {what}, {how}.",
    "{time} {who} carefully {did} {what} {how}.",
    "It was {who} who {did} {what}, {how}.",
    "{time}, with little fuss, {who} {did} {what} {how}.",
]


def sentence(lang: str, rng: random.Random) -> str:
    slots, templates = (ZH, ZH_TEMPLATES) if lang == "zh" else (EN, EN_TEMPLATES)
    s = rng.choice(templates).format(**{k: rng.choice(v) for k, v in slots.items()})
    return s[0].upper() + s[1:] if lang == "en" else s


def document(lang: str, rng: random.Random, sentences: int | None = None, paragraphs: int = 2) -> str:
    """A document of 6-10 sentences; within it, slot values do not repeat (real prose rarely repeats
    whole phrases, and the repetition rules would rightly object)."""
    slots, templates = (ZH, ZH_TEMPLATES) if lang == "zh" else (EN, EN_TEMPLATES)
    n = sentences or rng.randint(6, 10)
    picks = {k: rng.sample(v, min(n, len(v))) for k, v in slots.items()}
    sents = []
    for i in range(n):
        s = rng.choice(templates).format(**{k: p[i % len(p)] for k, p in picks.items()})
        sents.append(s[0].upper() + s[1:] if lang == "en" else s)
    cut = max(1, -(-n // paragraphs))
    sep = "" if lang == "zh" else " "
    return "\n\n".join(sep.join(sents[i:i + cut]) for i in range(0, n, cut))


def near_duplicate(text: str, lang: str, rng: random.Random, rate: float = 0.03) -> str:
    """An edited copy: a share `rate` of the words (en) or characters (zh) replaced, inserted or
    deleted, plus a line added at the end, as a re-posted article looks."""
    if lang == "zh":
        chars = list(text)
        pool = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
        for _ in range(max(1, int(len(chars) * rate))):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.5:
                chars[i] = rng.choice(pool)
            elif op < 0.75:
                chars.insert(i, rng.choice(pool))
            elif len(chars) > 1:
                del chars[i]
        return "".join(chars) + "\n（本文转载自网络）"
    words = text.split(" ")
    pool = ["very", "quite", "old", "new", "small", "local", "also", "then", "still", "again"]
    for _ in range(max(1, int(len(words) * rate))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(pool)
        elif op < 0.75:
            words.insert(i, rng.choice(pool))
        elif len(words) > 1:
            del words[i]
    return " ".join(words) + "\nReposted with permission."


def bad_documents(rng: random.Random) -> dict[str, list[str]]:
    """Documents that a given stage must remove, keyed by the stage's report key suffix."""
    zh_ok = document("zh", rng)
    en_ok = document("en", rng)
    return {
        "language": ["Le comité s'est réuni mardi pour discuter du budget de l'année prochaine et la plupart des membres "
                     "ont approuvé la proposition présentée par le maire.",
                     "Der Ausschuss traf sich am Dienstag, um den Haushalt für das nächste Jahr zu besprechen, und die "
                     "meisten Mitglieder stimmten dem Vorschlag zu.",
                     "今日は天気がとても良いので、私たちは公園へ散歩に行きました。桜がきれいに咲いていました。",
                     "1234 5678 9012 3456 7890 !!! ### 0000 1111"],
        "rules_zh": ["今天天气很好。",  # too short
                     "电话 0571 8888 8888 传真 0571 6666 6666 编号 2023 0001 0002 0003 0004 0005 价格 128 256 512 1024 2048 元",
                     "■■■ ★★★ 特价 ☆☆☆ ◆◆◆ ###### ****** |||||| 抢购 ▲▲▲ ●●● ※※※ ◎◎◎ ♦♦♦ 限时 ♣♣♣ ♥♥♥ ♠♠♠",
                     "\n".join(["欢迎光临本店，全场商品八折优惠，欢迎选购。"] * 8),
                     "哈" * 200,
                     ("好好学习天天向上" * 30)],
        "rules_en": ["It is a cat and the dog.",  # en_too_short
                     "BUY NOW AND SAVE! ALL OF THE PRICES ARE SLASHED TO THE BONE! CALL TODAY AND GET THE BEST DEAL IN "
                     "THE WHOLE TOWN! THIS IS THE OFFER OF THE YEAR AND IT IS FOR YOU!",  # en_uppercase
                     "In the table of the results the values were " + " ".join(
                         f"{rng.randint(1000, 99999)}.{rng.randint(10, 99)}" for _ in range(40)) + " and that is all."],
        "gopher": ["\n".join(["The committee of the town met and the budget was approved."] * 12),  # repeated lines
                   "The " + " and the ".join(["internationalisation", "incomprehensibilities", "counterrevolutionaries",
                                              "electroencephalographically", "uncharacteristically"] * 12) + ".",
                   "\n".join(f"The story of the {w} and the sea was long..." for w in
                             ["boat", "man", "dog", "cat", "bird", "fish", "tree", "house", "road", "hill"])],
        "boilerplate": ["\n".join(["首页 > 新闻中心 > 正文", "点击这里查看更多", "上一篇：关于我们", "下一篇：联系方式",
                                   "版权所有 © 2024 某某网站", "扫一扫关注我们的公众号", "京ICP备12345678号",
                                   "今天的新闻很少。"])],
        "sensitive_words": [zh_ok + "在线赌场，百家乐，老虎机，六合彩，时时彩，博彩网站注册就送彩金，真人荷官在线发牌。",
                            en_ok + " Online casino! Online casino bonus, porn, xxx, viagra, cialis, replica watches, "
                            "payday loan, buy followers now."],
    }


# ---- labelled junk for the quality benchmark ---------------------------------------------------------
# Each kind and language: the stage that should remove it (the report key suffix of that stage) and
# the rule it is made to trip, as a pattern of the removal reasons that rule gives (rules.py's and
# datatrove's Gopher filters' reason names), which the per-rule recall of benchmarks/clean_quality.py
# counts against. PII is masked, not removed: a pii_laden document another rule removes counts as
# removed, not as removed by "pii".
_ZH_REP, _EN_REP = "rules_zh", "gopher_repetition_en"
JUNK_KINDS = {
    "repeated_lines": {"zh": (_ZH_REP, r"zh_dup_line_(char_)?fraction"), "en": (_EN_REP, r"dup_line_(char_)?frac")},
    "repeated_paragraphs": {"zh": (_ZH_REP, r"zh_dup_para_(char_)?fraction"),
                            "en": (_EN_REP, r"dup_para_(char_)?frac")},
    "generation_loop": {"zh": (_ZH_REP, r"zh_dup_\d+_gram"), "en": (_EN_REP, r"duplicated_\d+_n_grams")},
    "keyword_stuffing": {"zh": (_ZH_REP, r"zh_top_\d+_gram"), "en": (_EN_REP, r"top_\d+_gram")},
    "boilerplate": {lang: ("boilerplate", "boilerplate") for lang in ("zh", "en")},
    **{kind: {lang: (f"rules_{lang}", f"{lang}_{rule}") for lang in ("zh", "en")}
       for kind, rule in (("mojibake", "mojibake"), ("symbol_soup", "symbols"), ("digit_soup", "digits"))},
    "pii_laden": {lang: ("pii", "pii") for lang in ("zh", "en")},
    "sensitive_words": {lang: ("sensitive_words", "sensitive_words") for lang in ("zh", "en")},
}
_ZH_SENT = __import__("re").compile(r"[^。！？!?\n]+[。！？!?]*")
_EN_SENT = __import__("re").compile(r"[^.!?\n]+[.!?]*")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰飞鹏辉建国文红梅婷雪琳晨宇浩然子涵"
_EN_NAMES = ["James", "Mary", "John", "Linda", "Robert", "Susan", "Michael", "Karen", "David", "Nancy", "Daniel",
             "Laura", "Paul", "Emma", "Mark", "Sarah", "Peter", "Helen", "George", "Alice"]
_EN_SURNAMES = ["Smith", "Brown", "Wilson", "Taylor", "Clark", "Walker", "Hall", "Young", "King", "Wright", "Green",
                "Baker", "Adams", "Nelson", "Hill", "Carter", "Mitchell", "Turner", "Parker", "Evans"]
_ZH_NAV = ["首页", "新闻中心", "产品展示", "联系我们", "关于我们", "网站地图", "在线留言", "客户服务", "加入收藏", "设为首页"]
_EN_NAV = ["Home", "About us", "Contact", "Products", "Blog", "Careers", "Sitemap", "Support", "Login", "Sign up"]


def split_sentences(text: str, lang: str) -> list[str]:
    rx = _ZH_SENT if lang == "zh" else _EN_SENT
    return [s.strip() for s in rx.findall(text) if len(s.strip()) >= (8 if lang == "zh" else 25)]


def _id_card(rng: random.Random) -> str:
    from .pii import ID_CHECK, ID_WEIGHTS

    body = f"{rng.choice([110101, 310104, 440305, 330106, 510107])}{rng.randint(1950, 2004)}" \
           f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    return body + ID_CHECK[sum(int(c) * w for c, w in zip(body, ID_WEIGHTS)) % 11]


def junk_document(kind: str, lang: str, rng: random.Random, material: list[str]) -> str:
    """A document of junk `kind` (see JUNK_KINDS) in `lang`, made from `material` (sentences of
    clean text, so that only the defect separates it from clean text)."""
    zh = lang == "zh"
    sep = "" if zh else " "
    pick = lambda k: rng.sample(material, min(k, len(material)))  # noqa: E731
    if kind == "repeated_lines":
        lines = pick(rng.randint(1, 3))
        body = [rng.choice(lines) for _ in range(rng.randint(8, 20))]
        return "\n".join(pick(2) + body)
    if kind == "repeated_paragraphs":
        para = sep.join(pick(rng.randint(2, 4)))
        return "\n\n".join([sep.join(pick(2))] + [para] * rng.randint(3, 6))
    if kind == "generation_loop":  # a model that fell into a loop: a fluent start, then one or two sentences again and again
        loop = pick(rng.randint(1, 2))
        start = sep.join(pick(rng.randint(1, 3)))
        return start + sep + sep.join(loop * rng.randint(8, 25))
    if kind == "keyword_stuffing":
        words = []
        for s in pick(4):
            s = s.strip("。！？.!? ")
            if zh:
                i = rng.randrange(max(1, len(s) - 4))
                words.append(s[i:i + rng.randint(2, 4)])
            else:
                ws = s.split()
                i = rng.randrange(max(1, len(ws) - 2))
                words.append(" ".join(ws[i:i + rng.randint(1, 2)]))
        suffixes = (["价格", "多少钱", "哪家好", "排名", "官网", "推荐", "2024", "最新", "大全", "图片"] if zh else
                    ["price", "cheap", "best", "online", "2024", "near me", "reviews", "deals", "buy", "free"])
        items = [rng.choice(words) + rng.choice(["", "", ("" if zh else " ") + rng.choice(suffixes)])
                 for _ in range(rng.randint(30, 70))]
        joiner = rng.choice([" ", "，", "|", "、"] if zh else [" ", ", ", " | ", " - "])
        head = sep.join(pick(1))
        return head + "\n" + joiner.join(items)
    if kind == "boilerplate":
        nav = _ZH_NAV if zh else _EN_NAV
        lines = [" | ".join(rng.sample(nav, 5))]
        if zh:
            lines += ["当前位置：首页 > 新闻中心 > 正文", rng.choice(material)[:40], "点击这里查看更多", "上一篇：" + rng.choice(material)[:15],
                      "下一篇：" + rng.choice(material)[:15], f"版权所有 © 20{rng.randint(10, 24)} 某某网络科技有限公司",
                      "扫一扫关注我们的公众号", f"京ICP备{rng.randint(10000000, 99999999)}号", "免责声明：本站部分内容来源于网络"]
        else:
            lines += ["Skip to main content", rng.choice(material)[:60], "Read more", "Share this article",
                      "Previous post: " + rng.choice(material)[:30], "Next post: " + rng.choice(material)[:30],
                      f"Copyright © 20{rng.randint(10, 24)} Example Media Ltd. All rights reserved.",
                      "Privacy Policy | Terms of Use | Cookie Settings", "Follow us on social media", "Accept all cookies"]
        return "\n".join(lines)
    if kind == "mojibake":
        text = sep.join(pick(rng.randint(4, 8)))
        if zh:
            how = rng.choice(["gbk", "gbk", "kunkao", "replacement"])
            if how == "gbk":  # UTF-8 bytes read as GBK
                return text.encode("utf-8").decode("gbk", errors="replace")
            if how == "kunkao":  # GBK bytes read as UTF-8 and written back ("锟斤拷")
                return "".join("锟斤拷" if rng.random() < 0.3 and c.strip() else c for c in text)
            return "".join("\ufffd\ufffd" if rng.random() < 0.3 and c.strip() else c for c in text)
        # curly quotes and dashes written as UTF-8, read as cp1252
        t = text.replace("'", "\u2019").replace(", ", " \u2014 ", 3)
        t = "\u201c" + t + "\u201d"
        words = t.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 5)):
            words[i] = words[i] + rng.choice(["\u2019s", "\u2026", "\u00e9", "\u2013"])
        return " ".join(words).encode("utf-8").decode("cp1252", errors="replace")
    if kind == "symbol_soup":
        syms = "■□▲△◆◇★☆●○※◎♦♣♥♠✔✘☞☜♪♫✈☎" + "😀🔥👍🎉💰🚀✨⚡"
        parts = []
        for s in pick(rng.randint(2, 4)):
            parts.append("".join(rng.choice(syms) for _ in range(rng.randint(4, 12))))
            parts.append(s[:rng.randint(6, 20)])
        return (" " if not zh else "").join(parts) + "".join(rng.choice(syms) for _ in range(10))
    if kind == "digit_soup":
        lines = [sep.join(pick(1))]
        for _ in range(rng.randint(8, 20)):
            nums = " ".join(f"{rng.randint(0, 99):02d}" for _ in range(rng.randint(5, 9)))
            lines.append((f"第{rng.randint(2020000, 2024999)}期 " if zh else f"Draw {rng.randint(1000, 9999)}: ") + nums)
        return "\n".join(lines)
    if kind == "pii_laden":
        lines = [sep.join(pick(1))]
        for _ in range(rng.randint(6, 14)):
            if zh:
                name = rng.choice(_SURNAMES) + "".join(rng.sample(_GIVEN, rng.randint(1, 2)))
                lines.append(f"{name} 手机：1{rng.choice('3456789')}{rng.randint(0, 999999999):09d} "
                             f"身份证：{_id_card(rng)} 邮箱：{name.encode('unicode_escape')[2:6].decode().lower()}"
                             f"{rng.randint(100, 999)}@163.com")
            else:
                first, last = rng.choice(_EN_NAMES), rng.choice(_EN_SURNAMES)
                lines.append(f"{first} {last}, phone +1 {rng.randint(200, 999)}-{rng.randint(200, 999)}-"
                             f"{rng.randint(1000, 9999)}, email {first.lower()}.{last.lower()}@example.com, "
                             f"last login from {rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                             f"{rng.randint(1, 254)}")
        return "\n".join(lines)
    if kind == "sensitive_words":
        words = (["在线赌场", "百家乐", "老虎机", "六合彩", "时时彩", "真人荷官", "博彩", "代开发票", "办证", "裸聊", "一夜情"]
                 if zh else ["online casino", "casino bonus", "porn", "xxx", "viagra", "cialis", "replica watches",
                             "payday loan", "buy followers", "sports betting", "escort service"])
        body = pick(rng.randint(3, 6))
        for _ in range(rng.randint(3, 6)):
            body.insert(rng.randrange(len(body) + 1), ("，".join if zh else ", ".join)(rng.sample(words, 3)) +
                        ("！" if zh else "!"))
        return sep.join(body)
    raise ValueError(f"unknown junk kind {kind!r}; choose from {sorted(JUNK_KINDS)}")
