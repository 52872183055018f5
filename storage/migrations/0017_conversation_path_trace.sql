-- 0017: conversation paths drive every agent. An agent with several paths marks one as its default (the others
-- stay linked for campaigns and agents' configurations that name them), and each turn of a call keeps the node
-- of the path it was spoken at and the edge taken to reach it, so a builder can see where callers drop off.

-- AlterTable: at most one default per agent is kept by storage/agents.py, which sets it in one UPDATE of all the
-- agent's links (a partial unique index would be an index schema.prisma cannot declare).
ALTER TABLE "AgentConversationPath" ADD COLUMN "isDefault" BOOLEAN NOT NULL DEFAULT false;

-- AlterTable
ALTER TABLE "CallTurn" ADD COLUMN "pathNodeId" TEXT;
ALTER TABLE "CallTurn" ADD COLUMN "pathEdgeId" TEXT;
