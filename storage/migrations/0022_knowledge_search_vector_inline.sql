-- 0022: a passage's "searchVector" stays in its row, so searching does not read the TOAST table.
--
-- A passage of ~1,000 characters has a tsvector of ~1.2 kB; with its text the row passes the 2 kB at which
-- PostgreSQL moves the largest value out of line, and as EXTENDED (the default) the tsvector went to the TOAST
-- table. Every search reads the "searchVector" of each passage of the linked knowledge bases (@@, then
-- ts_rank_cd on the candidates), so each such read was a TOAST index lookup: about half the search's time at
-- bench/bench_knowledge.py's scale. MAIN keeps the tsvector in the row (compressed, if ever needed, before it
-- would move out); the text, read only for the few passages returned, is the value that moves out instead.
ALTER TABLE "KnowledgeBaseChunk" ALTER COLUMN "searchVector" SET STORAGE MAIN;

-- SET STORAGE applies to values written from now on: rewrite the passages already stored (a new tsvector value,
-- since an unchanged one would keep its TOAST pointer).
UPDATE "KnowledgeBaseChunk" SET "searchVector" = "searchVector" || ''::tsvector;
