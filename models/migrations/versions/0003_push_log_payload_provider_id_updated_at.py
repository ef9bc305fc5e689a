"""push_log payload, provider id, updated_at; index on conversation.conversation_id

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.create_index('idx_conversation_members', ['conversation_id'], unique=False)
    with op.batch_alter_table('push_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('payload', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('provider_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(), server_default=sa.func.now(), nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_index('idx_conversation_members')
    with op.batch_alter_table('push_log', schema=None) as batch_op:
        batch_op.drop_column('updated_at')
        batch_op.drop_column('provider_id')
        batch_op.drop_column('payload')

