"""group chat: per-group message sequence, membership bounds, history index

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('chat_group', schema=None) as batch_op:
        batch_op.add_column(sa.Column('msg_seq', sa.BigInteger(), server_default='0', nullable=False))
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.add_column(sa.Column('joined_seq', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('left_seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('left_at', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('group_seq', sa.BigInteger(), nullable=True))
        batch_op.create_index('idx_conversation_msg', ['conversation_id', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('idx_conversation_msg')
        batch_op.drop_column('group_seq')
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.drop_column('left_at')
        batch_op.drop_column('left_seq')
        batch_op.drop_column('joined_seq')
    with op.batch_alter_table('chat_group', schema=None) as batch_op:
        batch_op.drop_column('msg_seq')
