"""durable receipts: each user's delivered position (conversation.last_delivered_msg_id) and the
receipt rows that the peers' `receipt` sync entries point at

Revision ID: 0019
Revises: 0018
"""
from alembic import op
import sqlalchemy as sa


revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

TABLE_ARGS = dict(mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci')
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_delivered_msg_id', sa.BigInteger(), nullable=True))
    op.create_table(
        'receipt',
        sa.Column('id', AUTO_ID, autoincrement=True, nullable=False),
        sa.Column('conversation_id', sa.String(100), nullable=False),
        sa.Column('reader_id', sa.BigInteger(), nullable=False),
        sa.Column('msg_id', sa.BigInteger(), nullable=False),
        sa.Column('kind', sa.SmallInteger(), nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_receipt')),
        **TABLE_ARGS,
    )
    op.create_index('idx_receipt_conversation', 'receipt', ['conversation_id', 'msg_id'])


def downgrade() -> None:
    op.drop_index('idx_receipt_conversation', table_name='receipt')
    op.drop_table('receipt')
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_column('last_delivered_msg_id')
