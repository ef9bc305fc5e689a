"""conversation.unread_count dropped: it was always 0

Unread counts live in Redis `unread:{uid}`, rebuilt from MySQL (message.status
for private chats, the read position and the sync stream for groups); the
column was written as 0 and never maintained, so it could only mislead.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_column('unread_count')


def downgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unread_count', sa.Integer(), server_default='0', nullable=False))
