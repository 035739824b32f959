# envelope: from=alice@example.org to=customer@example.com message=messages/multipart.eml
require ["fileinto", "body"];
if body :content "text/html" :contains "<b>order</b>" {
  fileinto "yes";
} else {
  fileinto "no";
}
